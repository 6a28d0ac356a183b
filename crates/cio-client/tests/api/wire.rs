//! What goes on the wire, captured by a raw TCP listener (the simulator's log has no headers).

use std::time::Duration;

use cio_client::{CioClient, ClientConfig, Credentials, Region, USER_AGENT};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Accepts one connection, returns its request head and answers `body` with 200.
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
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(answer.as_bytes()).await.unwrap();
    socket.shutdown().await.unwrap();
    String::from_utf8_lossy(&head).to_lowercase()
}

async fn client_for(listener: &TcpListener) -> CioClient {
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut cfg = ClientConfig::new(
        Credentials::new("wire-site", "wire-track", "wire-app"),
        Region::Eu,
    )
    .with_base_url(url::Url::parse(&base).unwrap());
    cfg.timeout = Duration::from_secs(5);
    CioClient::new(cfg).unwrap()
}

#[tokio::test]
async fn app_requests_carry_bearer_user_agent_and_json_content_type() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = client_for(&listener).await;
    let server = tokio::spawn(capture_one(listener, r#"{"segments":[]}"#));
    assert!(client.list_segments().await.unwrap().is_empty());
    let head = server.await.unwrap();
    assert!(head.starts_with("get /v1/segments http/1.1\r\n"), "{head}");
    assert!(
        head.contains("authorization: bearer wire-app\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("user-agent: {}\r\n", USER_AGENT.to_lowercase())),
        "{head}"
    );
    assert!(
        head.contains("content-type: application/json\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn track_requests_carry_basic_auth() {
    use base64::Engine as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = client_for(&listener).await;
    let server = tokio::spawn(capture_one(
        listener,
        r#"{"url":"https://track-eu.customer.io","region":"eu","environment_id":7}"#,
    ));
    let region = client.account_region().await.unwrap();
    assert_eq!(region.region, Region::Eu);
    assert_eq!(region.environment_id, 7);
    let head = server.await.unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode("wire-site:wire-track");
    assert!(
        head.starts_with("get /api/v1/accounts/region http/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!(
            "authorization: basic {}\r\n",
            basic.to_lowercase()
        )),
        "{head}"
    );
}
