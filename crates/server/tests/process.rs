//! The real `sharpsend-server` binary: `migrate`, refusing to start with pending migrations or
//! without keys, serving, the `health` probe, and a clean stop on SIGTERM.

use std::{process::Output, time::Duration};

use cio_sim::{SimConfig, Simulator};
use sharpsend_db::{db_test, testing::TestDatabase};
use tokio::process::Command;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn server(database_url: &str, sim_url: &str, sim: &SimConfig) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sharpsend-server"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("SHARPSEND_API_KEYS", "svc=process-test-key")
        .env("CIO_SITE_ID", &sim.site_id)
        .env("CIO_TRACK_API_KEY", &sim.track_api_key)
        .env("CIO_APP_API_KEY", &sim.app_api_key)
        .env("CIO_TRACK_BASE_URL", sim_url)
        .env("CIO_APP_BASE_URL", sim_url)
        .env("RUST_LOG", "warn");
    command
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn check(condition: bool, message: String) -> TestResult {
    if condition { Ok(()) } else { Err(message.into()) }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

db_test!(migrate_then_serve_then_stop_on_sigterm, unmigrated, |db: TestDatabase| async move {
    let sim = Simulator::spawn(SimConfig::demo()).await?;
    let config = sim.sim.config().clone();
    let url = sim.base_url();

    let refused = server(&db.url, &url, &config).output().await?;
    check(!refused.status.success(), format!("served with pending migrations: {}", text(&refused)))?;
    check(text(&refused).contains("sharpsend-server migrate"), text(&refused))?;

    let migrated = server(&db.url, &url, &config).arg("migrate").output().await?;
    check(migrated.status.success(), text(&migrated))?;
    check(text(&migrated).contains("applied 8 migration(s)"), text(&migrated))?;
    let again = server(&db.url, &url, &config).arg("migrate").output().await?;
    check(text(&again).contains("applied 0 migration(s)"), text(&again))?;

    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut running = server(&db.url, &url, &config).env("SHARPSEND_LISTEN", &addr).spawn()?;
    let probe = || server(&db.url, &url, &config).args(["health", "--addr", &addr]).output();
    let mut healthy = false;
    for _ in 0..100 {
        if probe().await?.status.success() {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check(healthy, "server never became healthy".into())?;

    let pid = running.id().ok_or("no pid")?;
    let killed = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    check(killed.success(), "kill failed".into())?;
    let status = tokio::time::timeout(Duration::from_secs(10), running.wait()).await??;
    check(status.success(), format!("exit after SIGTERM: {status}"))?;
    check(!probe().await?.status.success(), "health probe passes with the server gone".into())?;
    sim.shutdown().await;
    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
});

#[tokio::test]
async fn refuses_to_start_without_keys_or_with_malformed_settings() -> TestResult {
    let config = SimConfig::demo();
    let no_keys = server("sqlite::memory:", "http://127.0.0.1:9", &config).env_remove("SHARPSEND_API_KEYS").output().await?;
    check(!no_keys.status.success() && text(&no_keys).contains("SHARPSEND_API_KEYS"), text(&no_keys))?;

    for (variable, value) in [("CIO_REGION", "mars"), ("SHARPSEND_LISTEN", "nowhere"), ("CIO_APP_BASE_URL", "::")] {
        let out = server("sqlite::memory:", "http://127.0.0.1:9", &config).env(variable, value).output().await?;
        check(!out.status.success() && text(&out).contains(variable), format!("{variable}: {}", text(&out)))?;
    }
    let secret = "process-test-key";
    let out = server("sqlite::memory:", "http://127.0.0.1:9", &config).env("CIO_REGION", "mars").output().await?;
    check(!text(&out).contains(secret) && !text(&out).contains(&config.app_api_key), "a key was printed".into())?;
    Ok(())
}
