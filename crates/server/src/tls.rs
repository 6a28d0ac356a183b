//! TLS for the gRPC listener (`SHARPSEND_TLS_CERT` / `SHARPSEND_TLS_KEY`), optionally requiring
//! client certificates that chain to `SHARPSEND_TLS_CLIENT_CA` (mTLS). rustls with the ring
//! provider (the one already in the tree), HTTP/2 only (ALPN `h2`).
//!
//! Rotation without a restart: [`ReloadingCert`] is rustls' certificate resolver; at each
//! handshake it compares the files' modification times and sizes with those it loaded and
//! re-reads them when they changed. A pair that does not load (half-written, key not matching
//! the certificate) is logged and the previous certificate keeps serving. The client CA file is
//! looked at the same way for each new connection ([`ServerTls::acceptor`]): a changed one
//! takes effect for the next handshake; one that does not load keeps the previous CA.
//!
//! [`incoming`] turns accepted TCP connections (with `TCP_NODELAY` and keepalive, see
//! [`crate::app`]) into TLS connections for `serve_with_incoming`; each handshake runs in a task
//! of its own with a time limit, so a slow or silent client holds back no one.
//!
//! [`channel`] is the client side, for `sharpsend-server health` against a TLS server.

use std::{
    fs, io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use sharpsend_core::settings::TlsSettings;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Modification time and size: what tells a rewritten file.
type Stamp = (Option<SystemTime>, u64);

fn stamp(path: &Path) -> Stamp {
    fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()))
}

fn read_err(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::Read {
        what,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err("certificate", cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err("certificate", cert, e))?;
    if chain.is_empty() {
        return Err(read_err("certificate", cert, "no PEM certificate in it"));
    }
    // The key's own error text never holds key material, but say no more than the file.
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|_| read_err("private key", key, "no readable PEM private key in it"))?;
    CertifiedKey::from_der(chain, der, provider)
        .map_err(|e| TlsError::Config(format!("certificate and key do not go together: {e}")))
}

/// The server certificate, re-read when its files change (see the module doc).
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Stamp, Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Loads the pair now; an error here stops start-up.
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let provider = provider();
        let (cert_stamp, key_stamp) = (stamp(cert), stamp(key));
        let loaded = load_pair(cert, key, &provider)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            current: Mutex::new((cert_stamp, key_stamp, Arc::new(loaded))),
        })
    }

    /// The certificate to serve, re-read first if a file changed.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().ok()?;
        let (cert_stamp, key_stamp) = (stamp(&self.cert), stamp(&self.key));
        if (cert_stamp, key_stamp) != (current.0, current.1) {
            match load_pair(&self.cert, &self.key, &self.provider) {
                Ok(loaded) => {
                    tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    *current = (cert_stamp, key_stamp, Arc::new(loaded));
                }
                Err(e) => {
                    // Keep serving the previous pair; retry at the next handshake.
                    tracing::warn!(error = %e, "TLS certificate changed but did not load; serving the previous one");
                }
            }
        }
        Some(current.2.clone())
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// The CA certificates of a PEM file (`what` names it in errors).
fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| read_err(what, path, e))? {
        roots
            .add(cert.map_err(|e| read_err(what, path, e))?)
            .map_err(|e| read_err(what, path, e))?;
    }
    Ok(roots)
}

/// The CA client certificates must chain to, from its PEM file.
fn client_verifier(
    path: &Path,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots("client CA", path)?), provider)
        .build()
        .map_err(|e| read_err("client CA", path, e))
}

/// The rustls server configuration of `settings`, serving `cert`.
fn server_config(
    settings: &TlsSettings,
    cert: Arc<ReloadingCert>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The server's TLS: its configuration, rebuilt when the client CA file changes.
pub struct ServerTls {
    settings: TlsSettings,
    cert: Arc<ReloadingCert>,
    ca_stamp: Option<Stamp>,
    acceptor: TlsAcceptor,
}

impl ServerTls {
    /// Reads every file now; an error here stops start-up.
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        let cert = Arc::new(ReloadingCert::new(&settings.cert, &settings.key)?);
        let ca_stamp = settings.client_ca.as_deref().map(stamp);
        let config = server_config(settings, cert.clone())?;
        Ok(Self {
            settings: settings.clone(),
            cert,
            ca_stamp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The acceptor for the next connection, with the client CA re-read first if its file
    /// changed (the certificate pair is looked at by [`ReloadingCert`] at each handshake).
    pub fn acceptor(&mut self) -> TlsAcceptor {
        let now = self.settings.client_ca.as_deref().map(stamp);
        if now != self.ca_stamp {
            match server_config(&self.settings, self.cert.clone()) {
                Ok(config) => {
                    tracing::info!("TLS client CA reloaded");
                    self.acceptor = TlsAcceptor::from(Arc::new(config));
                    self.ca_stamp = now;
                }
                Err(e) => {
                    // Keep the previous CA; retry at the next connection.
                    tracing::warn!(error = %e, "TLS client CA changed but did not load; keeping the previous one");
                }
            }
        }
        self.acceptor.clone()
    }
}

/// What a client needs to reach a TLS server: the CA its certificate chains to, the name it
/// carries, and a client certificate and key when the server requires mTLS.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub server_name: String,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A gRPC channel to `addr` over TLS as `tls` says.
pub async fn channel(
    addr: std::net::SocketAddr,
    tls: &ClientTls,
    timeout: Duration,
) -> Result<tonic::transport::Channel, anyhow::Error> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots("CA", &tls.ca)?);
    let mut config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pair = load_pair(cert, key, &provider)?;
            let der = PrivateKeyDer::from_pem_file(key)
                .map_err(|_| read_err("private key", key, "no readable PEM private key in it"))?;
            builder.with_client_auth_cert(pair.cert, der)?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(tls.server_name.clone())
        .map_err(|e| TlsError::Config(format!("server name {:?}: {e}", tls.server_name)))?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_uri| {
            let (connector, name) = (connector.clone(), name.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}

/// A TLS connection to the server.
pub struct TlsConn(TlsStream<TcpStream>);

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// TLS connections from `tcp`, handshaken in tasks of their own; the task accepting them ends
/// when the stream is dropped (abort the handle when serving ends).
pub fn incoming(
    mut tcp: TcpIncoming,
    mut tls: ServerTls,
) -> (ReceiverStream<io::Result<TlsConn>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        while let Some(accepted) = tcp.next().await {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a connection failed");
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}
