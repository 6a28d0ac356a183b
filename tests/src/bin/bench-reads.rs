//! Read-path benchmark: prints figures, asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/bench-reads                       # SQLite; --database-url postgres://… for PostgreSQL
//! ```
//!
//! Starts `cio-sim`, `sharpsend-server` (production mode) and, as the anchor, a bare tonic server
//! answering `grpc.health.v1.Health/Check` (no interceptors, no middleware: the cost of a gRPC
//! call on this machine), each as its own process. Seeds 60 segments, a profile and a send, then
//! calls GetSegment, ListSegments (a page of 50), GetProfile (mirror) and GetSend over ONE
//! connection with 1 and 32 calls in flight for `--secs` seconds each, and prints requests/s,
//! p50 and p99 next to the anchor's, plus the server's and the scheduler's idle and peak RSS.
//! A second bare tonic server replays the service's ListSegments answer from memory (decoded by
//! the client as the real one is): the cost of moving that answer, printed as its own row.
//! Each call is measured in slices alternating with slices of the anchor (on the same number of
//! calls in flight), so that a shared machine's drifting speed moves both figures alike.
//! Output is a markdown section (for `docs/benchmarks.md`).

use sharpsend_tests::proc_stats::status_kib;
use std::{
    net::TcpListener,
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use clap::Parser;
use serde_json::json;
use sharpsend_proto::v1::{
    self as pb, campaign_service_client::CampaignServiceClient,
    ops_service_client::OpsServiceClient, profile_service_client::ProfileServiceClient,
    segment_service_client::SegmentServiceClient,
};
use tokio::process::{Child, Command};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

#[derive(Debug, Parser)]
#[command(about = "Read-path benchmark against a tonic echo anchor")]
struct Args {
    /// Seconds per (call, concurrency) measurement.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Concurrency levels, calls in flight on one connection.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    concurrency: Vec<usize>,
    /// Database; default a fresh SQLite file.
    #[arg(long)]
    database_url: Option<String>,
    /// Internal: serve the echo anchor on this address and wait.
    #[arg(long, hide = true)]
    serve_echo: Option<String>,
    /// Internal: serve the replay anchor on this address (with `--answer-file`) and wait.
    #[arg(long, hide = true)]
    serve_replay: Option<String>,
    /// Internal: the encoded answer the replay anchor gives.
    #[arg(long, hide = true)]
    answer_file: Option<PathBuf>,
}

const API_KEY: &str = "bench-key-0123456789";
const SITE: &str = "sim-site";
const TRACK_KEY: &str = "sim-track-key";
const APP_KEY: &str = "sim-app-key";

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} not found: build with `cargo build --release --bins` first",
        path.display()
    );
    Ok(path)
}

fn free_addr() -> anyhow::Result<String> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "?".into())
}

/// The anchor: a bare tonic server with the health service only.
async fn serve_echo(addr: &str) -> anyhow::Result<()> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let incoming = async_stream_of(listener);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// The replay anchor's service and method: any request gets the same encoded answer.
const REPLAY_PATH: &str = "/bench.Replay/Answer";

/// The second anchor: a bare tonic server answering every call of [`REPLAY_PATH`] with
/// `answer` (bytes of an encoded message, sent as they are).
async fn serve_replay(addr: &str, answer: Vec<u8>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tonic::transport::Server::builder()
        .add_service(replay::Replay(answer.into()))
        .serve_with_incoming(async_stream_of(listener))
        .await?;
    Ok(())
}

/// The replay anchor as a tonic service: a codec that moves bytes as they are, and a unary
/// method answering them.
mod replay {
    use std::convert::Infallible;
    use std::task::{Context, Poll};

    use prost::bytes::{Buf, BufMut, Bytes};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::codegen::{BoxFuture, Service, http};
    use tonic::{Request, Response, Status};

    #[derive(Debug, Clone, Copy, Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Bytes;
        type Decode = Bytes;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Bytes;
        type Error = Status;
        fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put(item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Bytes;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }

    /// Answers every call with its bytes.
    #[derive(Debug, Clone)]
    pub struct Replay(pub Bytes);

    impl tonic::server::NamedService for Replay {
        const NAME: &'static str = "bench.Replay";
    }

    struct Answer(Bytes);

    impl tonic::server::UnaryService<Bytes> for Answer {
        type Response = Bytes;
        type Future = std::future::Ready<Result<Response<Bytes>, Status>>;
        fn call(&mut self, _request: Request<Bytes>) -> Self::Future {
            std::future::ready(Ok(Response::new(self.0.clone())))
        }
    }

    impl Service<http::Request<tonic::body::Body>> for Replay {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
            let answer = Answer(self.0.clone());
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(RawCodec);
                Ok(grpc.unary(answer, request).await)
            })
        }
    }
}

/// Accepted connections with TCP_NODELAY, as the service sets it.
fn async_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}

fn service(cmd: &std::path::Path, database_url: &str, sim_url: &str) -> Command {
    let mut c = Command::new(cmd);
    c.env("DATABASE_URL", database_url)
        .env("CIO_SITE_ID", SITE)
        .env("CIO_TRACK_API_KEY", TRACK_KEY)
        .env("CIO_APP_API_KEY", APP_KEY)
        .env("CIO_TRACK_BASE_URL", sim_url)
        .env("CIO_APP_BASE_URL", sim_url)
        .env("CIO_APP_RATE_LIMIT", "1000")
        .env("SHARPSEND_API_KEYS", API_KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn wait_tcp(addr: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{addr} never listened")
}

fn authed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {API_KEY}").parse::<MetadataValue<_>>() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Requests/s, p50 and p99 of one measurement.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// Slices a measurement is cut into, alternating with the anchor's (see [`paired`]).
const SLICES: usize = 6;

/// Latencies (ms), errors and elapsed seconds of some runs of one call.
#[derive(Default)]
struct Samples {
    latencies: Vec<f64>,
    errors: u64,
    secs: f64,
}

impl Samples {
    fn figures(mut self) -> Figures {
        self.latencies.sort_by(f64::total_cmp);
        let all = &self.latencies;
        let at = |q: f64| {
            all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        Figures {
            rps: all.len() as f64 / self.secs,
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            errors: self.errors,
        }
    }
}

/// Runs `call` from `concurrency` tasks for `secs`, adding to `into`.
async fn sample<F, Fut>(concurrency: usize, secs: f64, call: &F, into: &mut Samples)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (call, latencies, errors) = (call.clone(), latencies.clone(), errors.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    if !call().await {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    mine.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                if let Ok(mut all) = latencies.lock() {
                    all.extend(mine);
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    into.secs += started.elapsed().as_secs_f64();
    into.errors += errors.load(std::sync::atomic::Ordering::Relaxed);
    if let Ok(mut l) = latencies.lock() {
        into.latencies.append(&mut l);
    }
}

/// Measures `call` and the `anchor` for `secs` each, in [`SLICES`] alternating slices, so that
/// a machine whose speed drifts (a shared VM) moves both alike: (anchor, call).
async fn paired<A, AFut, F, Fut>(
    concurrency: usize,
    secs: f64,
    anchor: &A,
    call: &F,
) -> (Figures, Figures)
where
    A: Fn() -> AFut + Clone + Send + 'static,
    AFut: Future<Output = bool> + Send,
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    // Warm-up, not counted.
    for _ in 0..50 {
        anchor().await;
        call().await;
    }
    let (mut a, mut b) = (Samples::default(), Samples::default());
    let slice = secs / SLICES as f64;
    for _ in 0..SLICES {
        sample(concurrency, slice, anchor, &mut a).await;
        sample(concurrency, slice, call, &mut b).await;
    }
    (a.figures(), b.figures())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = &args.serve_echo {
        return serve_echo(addr).await;
    }
    if let Some(addr) = &args.serve_replay {
        let file = args.answer_file.as_ref().context("--answer-file")?;
        return serve_replay(addr, std::fs::read(file)?).await;
    }
    cio_client::install_crypto_provider();
    let dir = tempfile::tempdir()?;
    let database_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()));
    let backend = if database_url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite"
    };

    let sim_addr = free_addr()?;
    let sim_url = format!("http://{sim_addr}");
    let _sim: Child = Command::new(bin("cio-sim")?)
        .args(["--listen", &sim_addr, "--app-rate-limit", "1000"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    wait_tcp(&sim_addr).await?;

    let echo_addr = free_addr()?;
    let _echo: Child = Command::new(std::env::current_exe()?)
        .args(["--serve-echo", &echo_addr])
        .kill_on_drop(true)
        .spawn()?;

    let server_bin = bin("sharpsend-server")?;
    let migrated = service(&server_bin, &database_url, &sim_url)
        .arg("migrate")
        .status()
        .await?;
    ensure!(migrated.success(), "migrate failed");
    let grpc = free_addr()?;
    let server = service(&server_bin, &database_url, &sim_url)
        .env("SHARPSEND_LISTEN", &grpc)
        .spawn()?;
    let scheduler = service(&bin("sharpsend-scheduler")?, &database_url, &sim_url).spawn()?;
    wait_tcp(&grpc).await?;
    wait_tcp(&echo_addr).await?;

    // Seed: 60 more segments in Customer.io, synced; a profile; a send.
    let http = reqwest::Client::new();
    for i in 0..60 {
        http.post(format!("{sim_url}/v1/segments"))
            .bearer_auth(APP_KEY)
            .json(&json!({"segment": {"name": format!("Bench segment {i:02}")}}))
            .send()
            .await?
            .error_for_status()?;
    }
    let channel = Channel::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let mut segments = SegmentServiceClient::new(channel.clone());
    // SyncSegments answers at once with its run; follow it until the mirror is filled.
    let run = segments
        .sync_segments(authed(pb::SyncSegmentsRequest {}))
        .await?
        .into_inner()
        .run
        .context("SyncSegments answered no run")?;
    let mut ops = OpsServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state = ops
            .get_job_run(authed(pb::GetJobRunRequest { run_id: run.id }))
            .await?
            .into_inner()
            .run
            .context("GetJobRun answered no run")?;
        if state.outcome == pb::JobRunOutcome::Succeeded as i32 {
            break;
        }
        ensure!(
            state.outcome == pb::JobRunOutcome::Running as i32 && Instant::now() < deadline,
            "segment-sync run {}: {:?} {}",
            run.id,
            state.outcome(),
            state.error
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = segments
        .list_segments(authed(pb::ListSegmentsRequest {
            page_size: 50,
            ..Default::default()
        }))
        .await?
        .into_inner();
    ensure!(
        listed.segments.len() == 50,
        "{} segments",
        listed.segments.len()
    );
    // The replay anchor answers what the service answered.
    let answer_file = dir.path().join("list-segments.answer");
    std::fs::write(&answer_file, prost::Message::encode_to_vec(&listed))?;
    let replay_addr = free_addr()?;
    let _replay: Child = Command::new(std::env::current_exe()?)
        .args(["--serve-replay", &replay_addr, "--answer-file"])
        .arg(&answer_file)
        .kill_on_drop(true)
        .spawn()?;
    wait_tcp(&replay_addr).await?;
    let replay_channel = Channel::from_shared(format!("http://{replay_addr}"))?
        .connect()
        .await?;
    let segment_id = listed
        .segments
        .iter()
        .find(|s| s.member_count.unwrap_or(0) > 0)
        .map(|s| s.id)
        .context("a segment with members")?;
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let attributes = prost_types::Struct {
        fields: [(
            "plan".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("pro".into())),
            },
        )]
        .into(),
    };
    profiles
        .update_attributes(authed(pb::UpdateAttributesRequest {
            customer_id: "u00001".into(),
            attributes: Some(attributes),
        }))
        .await?;
    let mut campaigns = CampaignServiceClient::new(channel.clone());
    let send = campaigns
        .send_assignment(authed(pb::SendAssignmentRequest {
            assignment_id: "bench-1".into(),
            title: "Bench".into(),
            subject: "Bench".into(),
            segment_ids: vec![segment_id],
            variations: vec![pb::ContentVariation {
                segment_id,
                body: "<p>bench</p>".into(),
                ..Default::default()
            }],
            delivery: Some(pb::send_assignment_request::Delivery::Newsletter(
                pb::NewsletterDelivery {
                    from_id: 0,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }))
        .await?
        .into_inner()
        .send
        .context("send")?;
    tokio::time::sleep(Duration::from_secs(2)).await; // idle before measuring memory
    let server_idle = server.id().and_then(|pid| status_kib(Some(pid), "VmRSS:"));
    let scheduler_idle = scheduler
        .id()
        .and_then(|pid| status_kib(Some(pid), "VmRSS:"));

    let echo_channel = Channel::from_shared(format!("http://{echo_addr}"))?
        .connect()
        .await?;
    let mut rows: Vec<(String, usize, Figures, Figures)> = Vec::new();
    for &c in &args.concurrency {
        let echo = {
            let ch = echo_channel.clone();
            move || {
                let mut client = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                async move {
                    client
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .is_ok()
                }
            }
        };

        let get_segment = {
            let ch = channel.clone();
            move || {
                let mut client = SegmentServiceClient::new(ch.clone());
                async move {
                    client
                        .get_segment(authed(pb::GetSegmentRequest { segment_id }))
                        .await
                        .is_ok()
                }
            }
        };
        let (anchor, figures) = paired(c, args.secs, &echo, &get_segment).await;
        rows.push(("SegmentService/GetSegment".into(), c, figures, anchor));
        let list = {
            let ch = channel.clone();
            move || {
                let mut client = SegmentServiceClient::new(ch.clone());
                async move {
                    client
                        .list_segments(authed(pb::ListSegmentsRequest {
                            page_size: 50,
                            ..Default::default()
                        }))
                        .await
                        .is_ok()
                }
            }
        };
        let (anchor, figures) = paired(c, args.secs, &echo, &list).await;
        rows.push((
            "SegmentService/ListSegments (50)".into(),
            c,
            figures,
            anchor,
        ));
        let replayed = {
            let ch = replay_channel.clone();
            move || {
                let mut grpc = tonic::client::Grpc::new(ch.clone());
                async move {
                    let codec = tonic_prost::ProstCodec::<
                        pb::ListSegmentsRequest,
                        pb::ListSegmentsResponse,
                    >::default();
                    let path = tonic::codegen::http::uri::PathAndQuery::from_static(REPLAY_PATH);
                    grpc.ready().await.is_ok()
                        && grpc
                            .unary(
                                authed(pb::ListSegmentsRequest {
                                    page_size: 50,
                                    ..Default::default()
                                }),
                                path,
                                codec,
                            )
                            .await
                            .is_ok_and(|answer| answer.into_inner().segments.len() == 50)
                }
            }
        };
        let (anchor, figures) = paired(c, args.secs, &echo, &replayed).await;
        rows.push((
            "anchor: plain tonic replaying that ListSegments answer".into(),
            c,
            figures,
            anchor,
        ));
        let profile = {
            let ch = channel.clone();
            move || {
                let mut client = ProfileServiceClient::new(ch.clone());
                async move {
                    client
                        .get_profile(authed(pb::GetProfileRequest {
                            customer: Some(pb::CustomerRef {
                                identifier: Some(pb::customer_ref::Identifier::Id("u00001".into())),
                            }),
                            fresh: false,
                            ..Default::default()
                        }))
                        .await
                        .is_ok()
                }
            }
        };
        let (anchor, figures) = paired(c, args.secs, &echo, &profile).await;
        rows.push((
            "ProfileService/GetProfile (mirror)".into(),
            c,
            figures,
            anchor,
        ));
        let get_send = {
            let (ch, id) = (channel.clone(), send.id.clone());
            move || {
                let mut client = CampaignServiceClient::new(ch.clone());
                let id = id.clone();
                async move {
                    client
                        .get_send(authed(pb::GetSendRequest {
                            send_id: id,
                            ..Default::default()
                        }))
                        .await
                        .is_ok()
                }
            }
        };
        let (anchor, figures) = paired(c, args.secs, &echo, &get_send).await;
        rows.push(("CampaignService/GetSend".into(), c, figures, anchor));
    }
    let server_peak = server.id().and_then(|pid| status_kib(Some(pid), "VmHWM:"));
    let scheduler_peak = scheduler
        .id()
        .and_then(|pid| status_kib(Some(pid), "VmHWM:"));

    println!(
        "### Reads on {backend} (one connection, {} s per figure, in {SLICES} slices alternating with the echo)\n",
        args.secs
    );
    println!(
        "| call | in flight | requests/s | p50 | p99 | echo requests/s | echo p99 | vs echo (rps) | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, c, f, anchor) in &rows {
        println!(
            "| {name} | {c} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.0}% | {} |",
            f.rps,
            f.p50_ms,
            f.p99_ms,
            anchor.rps,
            anchor.p99_ms,
            100.0 * f.rps / anchor.rps,
            f.errors
        );
    }
    println!(
        "\nRSS: server {} idle, {} peak; scheduler {} idle, {} peak.\n",
        mib(server_idle),
        mib(server_peak),
        mib(scheduler_idle),
        mib(scheduler_peak)
    );
    Ok(())
}
