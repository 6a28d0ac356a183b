//! [`RunningSim`]: a simulator serving on a local port.

use std::net::SocketAddr;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::Simulator;

/// A simulator serving on a local port (from [`Simulator::spawn`]).
#[derive(Debug)]
pub struct RunningSim {
    /// Bound address (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    /// The simulator's state handle.
    pub sim: Simulator,
    pub(super) shutdown: Option<oneshot::Sender<()>>,
    pub(super) task: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningSim {
    /// `http://127.0.0.1:PORT`: the base URL of both APIs (and of `/_sim/`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, drains open connections and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "simulator server ended with an error")
                }
                Err(err) => tracing::warn!(error = %err, "simulator task failed"),
            }
        }
    }
}

impl std::ops::Deref for RunningSim {
    type Target = Simulator;

    fn deref(&self) -> &Simulator {
        &self.sim
    }
}
