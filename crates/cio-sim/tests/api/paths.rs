//! Path segments on the wire, sent over a raw TCP connection (reqwest, like any WHATWG URL
//! library, resolves `%2E%2E` as `..` before sending, so it cannot send these paths).

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::helpers::{empty_unlimited, spawn};

/// Sends one HTTP/1.1 request and returns the status and the body text.
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    auth: &str,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut socket = TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {target} HTTP/1.1\r\nhost: sim\r\nauthorization: {auth}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[tokio::test]
async fn encoded_dots_are_an_id_literal_dots_are_resolved() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let addr = t.running.addr;
    let track = t.sim().config().track_authorization();
    let app = t.sim().config().app_authorization();

    for (encoded, id) in [("%2E%2E", ".."), ("%2e", "."), (".%2E", "..")] {
        let (status, body) = raw(
            addr,
            "PUT",
            &format!("/api/v1/customers/{encoded}"),
            &track,
            r#"{"plan":"gold"}"#,
        )
        .await?;
        assert_eq!(status, 200, "{encoded}: {body}");
        let person = t.sim().person(id).expect("created under the decoded id");
        assert_eq!(person.attributes["plan"], "gold");
        let (status, body) = raw(
            addr,
            "GET",
            &format!("/v1/customers/{encoded}/attributes"),
            &app,
            "",
        )
        .await?;
        assert_eq!(status, 200, "{body}");
        let read: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(read["customer"]["id"], id);
    }
    assert_eq!(t.sim().people_count(), 2);
    let logged: Vec<String> = t.sim().requests().into_iter().map(|r| r.path).collect();
    assert_eq!(logged[0], "/api/v1/customers/%2E%2E");

    // Literal dot segments are resolved before routing, never taken as an id.
    t.sim().clear_requests();
    let (status, _) = raw(addr, "PUT", "/api/v1/customers/..", &track, "{}").await?;
    assert_eq!(status, 404);
    let (status, _) = raw(addr, "PUT", "/api/v1/customers/x/../y", &track, "{}").await?;
    assert_eq!(status, 200);
    assert!(t.sim().person("y").is_some() && t.sim().person("x").is_none());
    let paths: Vec<String> = t.sim().requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/api/v1/", "/api/v1/customers/y"]);
    assert_eq!(t.sim().people_count(), 3);
    Ok(())
}
