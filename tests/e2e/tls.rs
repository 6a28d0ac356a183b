//! gRPC over TLS and mTLS with certificates made in the test (rcgen): a TLS call works,
//! plaintext to the TLS port is refused, mTLS refuses a client without a certificate (or with
//! one from another CA), a rewritten certificate or client CA is used for the next connection
//! without a restart, and `sharpsend-server health` works over TLS and mTLS.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::ensure;
use cio_sim::{RunningSim, SimConfig, Simulator};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sharpsend_core::{AppContext, clock::Clock, context::Migrations, settings::TlsSettings};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, segment_service_client::SegmentServiceClient};
use sharpsend_server::{app::check_health, tls::ClientTls};
use sharpsend_tests::{Bearer, TEST_API_KEY, sim_settings, test_settings};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// A CA and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { issuer })
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf for `localhost` / 127.0.0.1: (certificate PEM, key PEM, certificate DER, key DER).
    fn leaf(
        &self,
    ) -> anyhow::Result<(
        String,
        String,
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
    )> {
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &*self.issuer)?;
        let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(anyhow::Error::msg)?;
        Ok((cert.pem(), key.serialize_pem(), cert.der().clone(), key_der))
    }
}

/// Writes `cert` and `key` (PEM) where the server reads them, replacing any earlier ones whole.
fn install(dir: &Path, cert: &str, key: &str) -> anyhow::Result<()> {
    for (name, text) in [("server.key", key), ("server.pem", cert)] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

struct TlsServer {
    sim: RunningSim,
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    server: JoinHandle<Result<(), sharpsend_server::app::ServeError>>,
}

impl TlsServer {
    async fn start(db: &TestDatabase, tls: TlsSettings) -> anyhow::Result<Self> {
        sharpsend_tests::init_test_logging();
        let sim = Simulator::spawn(SimConfig::demo()).await?;
        let mut settings = test_settings(&db.url, sim_settings(&sim));
        settings.server.tls = Some(tls);
        let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::adjustable()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(sharpsend_server::serve(listener, ctx, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            sim,
            addr,
            stop,
            server,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        self.sim.shutdown().await;
        Ok(())
    }
}

/// A TLS channel to `addr` trusting `root`, presenting `client` (certificate, key) if given.
async fn tls_channel(
    addr: SocketAddr,
    root: CertificateDer<'static>,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<Channel> {
    let mut roots = RootCertStore::empty();
    roots.add(root)?;
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = ServerName::try_from("localhost")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}

/// ListSegments over `channel` with the test key.
async fn list(channel: Channel) -> Result<(), tonic::Status> {
    SegmentServiceClient::with_interceptor(channel, Bearer::new(Some(TEST_API_KEY)))
        .list_segments(pb::ListSegmentsRequest::default())
        .await
        .map(|_| ())
}

/// Whether a call over a TLS channel works (a refused handshake fails the connect or the call).
async fn works(
    addr: SocketAddr,
    root: CertificateDer<'static>,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> bool {
    match tls_channel(addr, root, client).await {
        Ok(channel) => list(channel).await.is_ok(),
        Err(_) => false,
    }
}

db_test!(
    tls_serves_refuses_plaintext_and_picks_up_a_new_certificate,
    |db: TestDatabase| async move {
        let dir = tempfile::tempdir()?;
        let first = Ca::new("first CA")?;
        let (cert, key, _, _) = first.leaf()?;
        install(dir.path(), &cert, &key)?;
        let server = TlsServer::start(
            &db,
            TlsSettings {
                cert: dir.path().join("server.pem"),
                key: dir.path().join("server.key"),
                client_ca: None,
            },
        )
        .await?;
        ensure!(
            works(server.addr, first.der(), None).await,
            "TLS call failed"
        );

        // Plaintext HTTP/2 to the TLS port gets no answer.
        let plaintext = async {
            let channel = Channel::from_shared(format!("http://{}", server.addr))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await?;
            list(channel).await.map_err(anyhow::Error::from)
        }
        .await;
        ensure!(plaintext.is_err(), "a plaintext call was answered");

        // Rotation: a certificate from another CA replaces the first on disk; the next connection
        // gets it, without a restart.
        let second = Ca::new("second CA")?;
        ensure!(
            !works(server.addr, second.der(), None).await,
            "trusted before rotation"
        );
        let (cert, key, _, _) = second.leaf()?;
        install(dir.path(), &cert, &key)?;
        ensure!(
            works(server.addr, second.der(), None).await,
            "rotated certificate not served"
        );
        ensure!(
            !works(server.addr, first.der(), None).await,
            "old certificate still served"
        );

        // A broken file is not loaded: the current certificate keeps serving.
        std::fs::write(dir.path().join("server.pem"), "not a certificate")?;
        ensure!(
            works(server.addr, second.der(), None).await,
            "a broken file stopped serving"
        );
        server.stop().await
    }
);

db_test!(
    mtls_requires_a_client_certificate_from_the_ca,
    |db: TestDatabase| async move {
        let dir = tempfile::tempdir()?;
        let ca = Ca::new("service CA")?;
        let (cert, key, _, _) = ca.leaf()?;
        install(dir.path(), &cert, &key)?;
        let clients = Ca::new("client CA")?;
        std::fs::write(dir.path().join("clients.pem"), clients.pem())?;
        let server = TlsServer::start(
            &db,
            TlsSettings {
                cert: dir.path().join("server.pem"),
                key: dir.path().join("server.key"),
                client_ca: Some(dir.path().join("clients.pem")),
            },
        )
        .await?;
        let (_, _, client_cert, client_key) = clients.leaf()?;
        ensure!(
            works(server.addr, ca.der(), Some((client_cert, client_key))).await,
            "mTLS call with a good client certificate failed"
        );
        ensure!(
            !works(server.addr, ca.der(), None).await,
            "no client certificate was accepted"
        );
        let stranger = Ca::new("stranger CA")?;
        let (stranger_pem, stranger_key_pem, other_cert, other_key) = stranger.leaf()?;
        ensure!(
            !works(
                server.addr,
                ca.der(),
                Some((other_cert.clone(), other_key.clone_key()))
            )
            .await,
            "a client certificate of another CA was accepted"
        );

        // `sharpsend-server health` over mTLS: with the service CA and a client certificate.
        std::fs::write(dir.path().join("service-ca.pem"), ca.pem())?;
        let (client_pem, client_key_pem, _, _) = clients.leaf()?;
        std::fs::write(dir.path().join("client.pem"), client_pem)?;
        std::fs::write(dir.path().join("client.key"), client_key_pem)?;
        let probe = |identity: Option<(&str, &str)>| ClientTls {
            ca: dir.path().join("service-ca.pem"),
            server_name: "localhost".into(),
            identity: identity.map(|(c, k)| (dir.path().join(c), dir.path().join(k))),
        };
        check_health(
            server.addr,
            Some(&probe(Some(("client.pem", "client.key")))),
        )
        .await?;
        ensure!(
            check_health(server.addr, Some(&probe(None))).await.is_err(),
            "health answered without a client certificate"
        );
        ensure!(
            check_health(server.addr, None).await.is_err(),
            "health answered in plaintext"
        );

        // Client CA rotation without a restart: the stranger's CA replaces the file; the next
        // connection is judged by it.
        let ca_file = dir.path().join("clients.pem");
        let tmp = dir.path().join("clients.pem.tmp");
        std::fs::write(&tmp, stranger.pem())?;
        std::fs::rename(&tmp, &ca_file)?;
        ensure!(
            works(
                server.addr,
                ca.der(),
                Some((other_cert.clone(), other_key.clone_key()))
            )
            .await,
            "a client of the new CA was refused"
        );
        let (_, _, old_cert, old_key) = clients.leaf()?;
        ensure!(
            !works(server.addr, ca.der(), Some((old_cert, old_key))).await,
            "a client of the replaced CA was still accepted"
        );
        // A CA file that does not load keeps the previous CA.
        std::fs::write(&ca_file, "not a certificate")?;
        std::fs::write(dir.path().join("client.pem"), stranger_pem)?;
        std::fs::write(dir.path().join("client.key"), stranger_key_pem)?;
        check_health(
            server.addr,
            Some(&probe(Some(("client.pem", "client.key")))),
        )
        .await?;
        server.stop().await
    }
);
