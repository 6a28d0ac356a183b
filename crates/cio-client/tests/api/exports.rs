//! Customer exports against the simulator: create, poll, signed link, credential-free streamed
//! download parsed into rows; expiry, failures, and what the download request carries.

use std::time::Duration;

use cio_client::{CioError, DownloadError, ExportRow};
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use crate::helpers::{client, spawn_empty_sim};

fn add_people(sim: &cio_sim::Simulator, n: usize) {
    for i in 0..n {
        let attrs = json!({
            "email": format!("p{i}@example.com"),
            "plan": if i % 3 == 0 { "pro" } else { "free" },
            "note": format!("line {i}, with \"quotes\"\nand a break"),
        });
        sim.upsert_person(&format!("p{i:05}"), attrs.as_object().cloned().unwrap());
    }
}

#[tokio::test]
async fn a_backfill_reads_every_matching_person_from_the_file() {
    let sim = spawn_empty_sim().await;
    add_people(&sim, 3000);
    let client = client(&sim);
    let filter = json!({"attribute": {"field": "plan", "operator": "eq", "value": "pro"}});
    let export = client
        .create_customer_export(&filter, &["plan", "note", "missing"])
        .await
        .unwrap();
    assert!(!export.is_done() && !export.is_failed());
    assert_eq!(export.kind.as_deref(), Some("customers"));
    assert_eq!(export.rows(), 0);
    // Not done: the link is refused.
    let early = client.export_download_url(export.id).await.unwrap_err();
    assert!(
        matches!(early, CioError::Rejected { status: 400, .. }),
        "{early:?}"
    );

    sim.advance(Duration::from_secs(5));
    let done = client.get_export(export.id).await.unwrap();
    assert!(done.is_done(), "{done:?}");
    assert_eq!(done.rows(), 1000);

    let url = client.export_download_url(export.id).await.unwrap();
    let rows: Vec<ExportRow> = client.export_rows(&url).try_collect().await.unwrap();
    assert_eq!(rows.len(), 1000);
    assert_eq!(
        rows[0].columns(),
        ["id", "email", "cio_id", "plan", "note", "missing"]
    );
    for (n, row) in rows.iter().enumerate() {
        let i = n * 3;
        let person = sim.person(&format!("p{i:05}")).unwrap();
        assert_eq!(row.id(), person.id.as_deref());
        assert_eq!(row.email(), person.email.as_deref());
        assert_eq!(row.cio_id(), Some(person.cio_id.as_str()));
        assert_eq!(row.get("plan"), Some("pro"));
        assert_eq!(
            row.get("note"),
            Some(format!("line {i}, with \"quotes\"\nand a break").as_str())
        );
        assert_eq!(row.get("missing"), Some(""));
    }
    // The file came in several chunks (it is streamed, not read whole).
    let chunks: Vec<_> = client.download_export(&url).try_collect().await.unwrap();
    assert!(chunks.len() > 2, "{} chunks", chunks.len());

    // Nothing but the App calls reached the App API (the download is not an App request).
    assert!(
        sim.requests()
            .iter()
            .all(|r| r.path.starts_with("/v1/exports")),
        "{:?}",
        sim.requests()
    );

    // 15 minutes later the link is refused; a fresh one works.
    sim.advance(Duration::from_secs(16 * 60));
    let refused: Vec<_> = client.export_rows(&url).collect().await;
    assert!(
        matches!(
            refused.as_slice(),
            [Err(DownloadError::LinkRefused { status: 403 })]
        ),
        "{refused:?}"
    );
    assert!(refused[0].as_ref().unwrap_err().is_retryable());
    let fresh = client.export_download_url(export.id).await.unwrap();
    assert_eq!(client.export_rows(&fresh).count().await, 1000);
}

#[tokio::test]
async fn failed_exports_and_bad_filters() {
    let sim = spawn_empty_sim().await;
    add_people(&sim, 3);
    let client = client(&sim);
    sim.fail_next_exports(1);
    let export = client
        .create_customer_export(&json!({"segment": {"id": 1}}).clone(), &[] as &[&str])
        .await;
    // Segment 1 does not exist in an empty workspace: 400, nothing created, no failure used.
    assert!(
        matches!(export, Err(CioError::Rejected { status: 400, .. })),
        "{export:?}"
    );
    let any = json!({"attribute": {"field": "email", "operator": "exists"}});
    let export = client
        .create_customer_export(&any, &[] as &[&str])
        .await
        .unwrap();
    sim.advance(Duration::from_secs(5));
    let failed = client.get_export(export.id).await.unwrap();
    assert!(failed.is_failed() && !failed.is_done(), "{failed:?}");
    let missing = client.get_export(999).await.unwrap_err();
    assert!(matches!(missing, CioError::NotFound { .. }), "{missing:?}");
    let bad = client
        .create_customer_export(&json!({"and": []}), &["x"])
        .await
        .unwrap_err();
    assert_eq!(bad.status(), Some(400));
    assert_eq!(bad.details()[0].field.as_deref(), Some("/filters/and"));
}

/// Accepts one connection, returns its request head and answers a small CSV.
async fn capture_one(listener: TcpListener, body: &'static str) -> String {
    let (mut socket, _) = listener.accept().await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed early");
        head.extend_from_slice(&buf[..n]);
    }
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/csv\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(answer.as_bytes()).await.unwrap();
    socket.shutdown().await.unwrap();
    String::from_utf8_lossy(&head).to_lowercase()
}

#[tokio::test]
async fn the_download_carries_no_credentials_to_the_other_host() {
    let sim = spawn_empty_sim().await;
    let client = client(&sim);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = url::Url::parse(&format!(
        "http://{}/bucket/export.csv?X-Amz-Signature=abc",
        listener.local_addr().unwrap()
    ))
    .unwrap();
    let server = tokio::spawn(capture_one(listener, "id,email,cio_id\r\n1,a@x.io,c1"));
    let rows: Vec<ExportRow> = client.export_rows(&url).try_collect().await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].email(), Some("a@x.io"));
    let head = server.await.unwrap();
    assert!(
        head.starts_with("get /bucket/export.csv?x-amz-signature=abc http/1.1\r\n"),
        "{head}"
    );
    assert!(!head.contains("authorization"), "{head}");
    assert!(
        !head.contains(&sim.config().app_api_key.to_lowercase()),
        "{head}"
    );
    assert!(!head.contains("application/json"), "{head}");
}

#[tokio::test]
async fn download_errors_never_show_the_link() {
    let sim = spawn_empty_sim().await;
    let client = client(&sim);
    // Nobody listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let url = url::Url::parse(&format!("http://{addr}/f.csv?signature=SECRET-SIG")).unwrap();
    let errors: Vec<_> = client.download_export(&url).collect().await;
    let [Err(error)] = errors.as_slice() else {
        panic!("{errors:?}");
    };
    assert!(
        matches!(error, DownloadError::Transport { .. }),
        "{error:?}"
    );
    assert!(!format!("{error} {error:?}").contains("SECRET-SIG"));
    let ftp = url::Url::parse("ftp://example.com/x.csv").unwrap();
    let errors: Vec<_> = client.download_export(&ftp).collect().await;
    assert!(matches!(
        errors.as_slice(),
        [Err(DownloadError::InvalidUrl)]
    ));
}
