//! API keys, roles and the audit record end to end (issue #17): keys created by AdminService
//! work at once and stop at revocation; every RPC × every role is allowed or
//! `PERMISSION_DENIED` exactly as `sharpsend_server::access::RULES` says (an RPC without a rule
//! is refused to all); the audit record names who did what to which ids with what outcome, is
//! filtered and paged, and refuses UPDATE and DELETE. TLS is in `tls.rs`.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, ensure};
use prost::Message as _;
use sea_orm::ConnectionTrait as _;
use sharpsend_db::{api_keys::Role, db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient,
    segment_service_client::SegmentServiceClient,
};
use sharpsend_server::access;
use sharpsend_tests::{Bearer, TEST_API_KEY, TestApp};
use tonic::{Code, Request, Status, codegen::http::uri::PathAndQuery, transport::Channel};

type Admin = AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

const ROLES: [(Role, pb::Role); 4] = [
    (Role::Reader, pb::Role::Reader),
    (Role::Writer, pb::Role::Writer),
    (Role::Sender, pb::Role::Sender),
    (Role::Admin, pb::Role::Admin),
];

/// Creates a key of `role` for the caller's workspace; answers (key id, secret).
async fn create_key(
    admin: &mut Admin,
    name: &str,
    role: pb::Role,
) -> anyhow::Result<(String, String)> {
    let created = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: name.into(),
            role: role as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let key = created.key.context("no key")?;
    Ok((key.key_id, created.secret))
}

/// Calls `path` with an empty request and answers the status code (OK when answered).
async fn call_empty(
    channel: Channel,
    key: &str,
    path: &str,
    streaming: bool,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = Request::new(());
    let value = format!("Bearer {key}")
        .parse()
        .map_err(|_| Status::internal("test key"))?;
    request.metadata_mut().insert("authorization", value);
    let path = PathAndQuery::try_from(path.to_owned()).map_err(|_| Status::internal("path"))?;
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    if streaming {
        // The answer's headers say whether the call got past access control; an endless stream
        // (WatchEngagement) is not read to its end.
        grpc.server_streaming(request, path, codec)
            .await
            .map(|_| ())
    } else {
        grpc.unary(request, path, codec).await.map(|_| ())
    }
}

/// Every method of every service of the package, with whether it streams its answer.
fn served_methods() -> anyhow::Result<Vec<(String, bool)>> {
    let set = prost_types::FileDescriptorSet::decode(sharpsend_proto::FILE_DESCRIPTOR_SET)?;
    let mut methods = Vec::new();
    for file in set.file {
        for service in &file.service {
            for method in &service.method {
                methods.push((
                    format!("/{}.{}/{}", file.package(), service.name(), method.name()),
                    method.server_streaming(),
                ));
            }
        }
    }
    Ok(methods)
}

db_test!(
    every_rpc_by_every_role_is_allowed_or_permission_denied,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut admin = app.admin().await?;
        let mut keys = Vec::new();
        for (role, proto) in ROLES {
            keys.push((
                role,
                create_key(&mut admin, &format!("matrix-{role}"), proto)
                    .await?
                    .1,
            ));
        }
        let channel = app.channel().await?;
        let methods = served_methods()?;
        ensure!(methods.len() > 30, "{methods:?}");
        let mut failures = Vec::new();
        let mut cells = 0;
        for (path, streaming) in &methods {
            let needed = access::rule(path).map(|r| r.role);
            for (role, secret) in &keys {
                cells += 1;
                let result = call_empty(channel.clone(), secret, path, *streaming).await;
                let code = result.as_ref().err().map_or(Code::Ok, Status::code);
                // The matrix's keys are bound to the default workspace: RPCs for all-workspaces
                // admins only refuse them too.
                let allowed = needed.is_some_and(|n| role.includes(n))
                    && !access::ALL_WORKSPACES_ONLY.contains(&path.as_str());
                if allowed {
                    if matches!(code, Code::PermissionDenied | Code::Unauthenticated) {
                        failures.push(format!(
                            "{path} as {role}: refused {code:?}, wanted allowed"
                        ));
                    }
                } else {
                    match result {
                        Err(status) if status.code() == Code::PermissionDenied => {
                            if !status.details().is_empty()
                                || status.message() != "permission denied"
                            {
                                failures.push(format!(
                                    "{path} as {role}: PERMISSION_DENIED says more than it should: {:?}",
                                    status.message()
                                ));
                            }
                        }
                        other => failures.push(format!(
                            "{path} as {role}: {:?}, wanted PERMISSION_DENIED",
                            other.err().map(|s| s.code())
                        )),
                    }
                }
            }
        }
        ensure!(
            failures.is_empty(),
            "{} of {cells} cells wrong:\n{}",
            failures.len(),
            failures.join("\n")
        );
        ensure!(cells == methods.len() * 4);
        app.stop().await
    }
);

db_test!(
    created_keys_work_at_once_and_stop_when_revoked,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut admin = app.admin().await?;
        let (key_id, secret) = create_key(&mut admin, "dashboard", pb::Role::Reader).await?;
        ensure!(secret.starts_with(&format!("ssk_{key_id}_")), "{secret}");

        // Listed without the secret; the hash is not the secret either.
        let listed = admin
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await?
            .into_inner();
        let shown = format!("{listed:?}");
        // Everything after the key id: its base64url alphabet has `_` too, so a split on the
        // last `_` can leave a letter or two that any listing contains.
        let secret_part = secret
            .strip_prefix(&format!("ssk_{key_id}_"))
            .context("the secret follows the key id")?;
        ensure!(secret_part.len() >= 43, "{secret}");
        ensure!(
            shown.contains(&key_id) && !shown.contains(secret_part),
            "{shown}"
        );
        let key = listed
            .keys
            .iter()
            .find(|k| k.key_id == key_id)
            .context("not listed")?;
        ensure!(key.role == pb::Role::Reader as i32 && key.workspace_id == app.ctx.workspace_id());
        ensure!(!key.all_workspaces && key.created_by == "config:e2e" && key.revoked_at.is_none());
        let stored: Vec<String> =
            <sharpsend_db::entities::api_keys::Entity as sea_orm::EntityTrait>::find()
                .all(&app.ctx.db)
                .await?
                .into_iter()
                .map(|m| format!("{m:?}"))
                .collect();
        ensure!(
            stored.iter().all(|row| !row.contains(secret_part)),
            "{stored:?}"
        );

        // A reader reads, and may not write.
        let mut reader = SegmentServiceClient::with_interceptor(
            app.channel().await?,
            Bearer::new(Some(&secret)),
        );
        reader
            .list_segments(pb::ListSegmentsRequest::default())
            .await?;
        let denied = reader
            .create_segment(pb::CreateSegmentRequest {
                name: "not allowed".into(),
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(denied == Some(Code::PermissionDenied), "{denied:?}");
        // A wrong secret with the right id is no key at all.
        let forged = format!("ssk_{key_id}_{}", "A".repeat(43));
        let mut forger = SegmentServiceClient::with_interceptor(
            app.channel().await?,
            Bearer::new(Some(&forged)),
        );
        let refused = forger
            .list_segments(pb::ListSegmentsRequest::default())
            .await
            .err()
            .map(|s| s.code());
        ensure!(refused == Some(Code::Unauthenticated), "{refused:?}");

        // Revoked: refused at the next call (this server forgets the cached key at once).
        let revoked = admin
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: key_id.clone(),
            })
            .await?
            .into_inner()
            .key
            .context("no key")?;
        ensure!(revoked.revoked_at.is_some());
        let refused = reader
            .list_segments(pb::ListSegmentsRequest::default())
            .await
            .err()
            .map(|s| s.code());
        ensure!(refused == Some(Code::Unauthenticated), "{refused:?}");
        // Revoking again answers it as it is; it is listed only when asked for.
        let again = admin
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: key_id.clone(),
            })
            .await?
            .into_inner()
            .key
            .context("no key")?;
        ensure!(again.revoked_at == revoked.revoked_at);
        let active = admin
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await?
            .into_inner();
        ensure!(active.keys.iter().all(|k| k.key_id != key_id));
        let all = admin
            .list_api_keys(pb::ListApiKeysRequest {
                include_revoked: true,
            })
            .await?
            .into_inner();
        ensure!(all.keys.iter().any(|k| k.key_id == key_id));
        app.stop().await
    }
);

db_test!(
    workspace_bound_admins_stay_in_their_workspace,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut root = app.admin().await?;
        let (_, bound_secret) = create_key(&mut root, "ws-admin", pb::Role::Admin).await?;
        let mut bound = app.admin_with_key(Some(&bound_secret)).await?;
        // It may create keys in its workspace, not for every workspace or another one.
        create_key(&mut bound, "ws-reader", pb::Role::Reader).await?;
        let all = bound
            .create_api_key(pb::CreateApiKeyRequest {
                name: "everything".into(),
                role: pb::Role::Admin as i32,
                all_workspaces: true,
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(all == Some(Code::InvalidArgument), "{all:?}");
        let other = bound
            .create_api_key(pb::CreateApiKeyRequest {
                name: "elsewhere".into(),
                role: pb::Role::Reader as i32,
                workspace_id: app.ctx.workspace_id() + 1,
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(other == Some(Code::NotFound), "{other:?}");
        // The deployment's configured key may create an all-workspaces admin; the bound admin
        // does not see it, and cannot revoke it (NOT_FOUND, nothing more).
        let global = root
            .create_api_key(pb::CreateApiKeyRequest {
                name: "global".into(),
                role: pb::Role::Admin as i32,
                all_workspaces: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .key
            .context("no key")?;
        ensure!(global.all_workspaces && global.workspace_id == 0);
        let seen = bound
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await?
            .into_inner();
        ensure!(
            seen.keys.iter().all(|k| k.key_id != global.key_id),
            "{seen:?}"
        );
        let revoke = bound
            .revoke_api_key(pb::RevokeApiKeyRequest {
                key_id: global.key_id.clone(),
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(revoke == Some(Code::NotFound), "{revoke:?}");
        app.stop().await
    }
);

/// Audit events of `key_id`, newest first, waiting until there are at least `n` (they are
/// written as each call ends).
async fn events_of(
    admin: &mut Admin,
    key_id: &str,
    n: usize,
) -> anyhow::Result<Vec<pb::AuditEvent>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                key_id: key_id.into(),
                page_size: 500,
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        if events.len() >= n {
            return Ok(events);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{} of {n} audit events: {events:?}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(event: &pb::AuditEvent) -> BTreeMap<String, String> {
    event
        .ids
        .as_ref()
        .map(|s| {
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), format!("{:?}", v.kind)))
                .collect()
        })
        .unwrap_or_default()
}

db_test!(
    the_audit_names_who_did_what_to_which_ids,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut admin = app.admin().await?;
        let (key_id, secret) = create_key(&mut admin, "crm-sync", pb::Role::Writer).await?;
        let mut writer = SegmentServiceClient::with_interceptor(
            app.channel().await?,
            Bearer::new(Some(&secret)),
        );
        let segment = writer
            .create_segment(pb::CreateSegmentRequest {
                name: "audited".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("no segment")?;
        writer
            .add_segment_members(pb::AddSegmentMembersRequest {
                segment_id: segment.id,
                customer_ids: vec!["u-1".into(), "u-2".into()],
            })
            .await?;
        // A failed change and a refused one are recorded too; reads are not.
        let missing = writer
            .delete_segment(pb::DeleteSegmentRequest {
                segment_id: i64::MAX,
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(missing == Some(Code::NotFound), "{missing:?}");
        writer
            .list_segments(pb::ListSegmentsRequest::default())
            .await?;
        let mut as_writer_ops =
            sharpsend_proto::v1::ops_service_client::OpsServiceClient::with_interceptor(
                app.channel().await?,
                Bearer::new(Some(&secret)),
            );
        let denied = as_writer_ops
            .run_job(pb::RunJobRequest {
                job: "segment-sync".into(),
                request_id: String::new(),
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(denied == Some(Code::PermissionDenied), "{denied:?}");

        let events = events_of(&mut admin, &key_id, 4).await?;
        let summary: Vec<(String, String)> = events
            .iter()
            .map(|e| {
                (
                    e.action.rsplit('/').next().unwrap_or_default().to_owned(),
                    e.outcome.clone(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = [
            ("RunJob", "PERMISSION_DENIED"),
            ("DeleteSegment", "NOT_FOUND"),
            ("AddSegmentMembers", "OK"),
            ("CreateSegment", "OK"),
        ]
        .iter()
        .map(|(a, o)| ((*a).to_owned(), (*o).to_owned()))
        .collect();
        ensure!(summary == expected, "{summary:?}");
        let add = &events[2];
        ensure!(
            add.key_name == "crm-sync"
                && add.role == pb::Role::Writer as i32
                && add.key_id == key_id
        );
        ensure!(add.workspace_id == app.ctx.workspace_id() && add.at.is_some());
        let add_ids = ids(add);
        ensure!(
            add_ids
                .get("segment_id")
                .is_some_and(|v| v.contains(&segment.id.to_string())),
            "{add_ids:?}"
        );
        ensure!(
            add_ids
                .get("customer_ids")
                .is_some_and(|v| v.contains("u-1") && v.contains("u-2")),
            "{add_ids:?}"
        );
        ensure!(
            ids(&events[0])
                .get("job")
                .is_some_and(|v| v.contains("segment-sync"))
        );

        // The admin's own key creation is recorded under its configured name.
        let mine = events_of(&mut admin, "config:e2e", 1).await?;
        ensure!(
            mine.iter()
                .any(|e| e.action.ends_with("/CreateApiKey") && e.outcome == "OK")
        );

        // Filters: by action (short or full), by time; paging walks everything once.
        let by_action = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                action: "SegmentService/AddSegmentMembers".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        ensure!(
            by_action.len() == 1 && by_action[0].id == add.id,
            "{by_action:?}"
        );
        let later =
            sharpsend_server::convert::timestamp(app.ctx.now() + chrono::Duration::hours(1));
        let none = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                since: Some(later),
                ..Default::default()
            })
            .await?
            .into_inner()
            .events;
        ensure!(none.is_empty(), "{none:?}");
        let mut token = String::new();
        let mut paged = Vec::new();
        loop {
            let page = admin
                .list_audit_events(pb::ListAuditEventsRequest {
                    key_id: key_id.clone(),
                    page_size: 1,
                    page_token: token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            paged.extend(page.events.iter().map(|e| e.id));
            token = page.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        ensure!(
            paged == events.iter().map(|e| e.id).collect::<Vec<_>>(),
            "{paged:?}"
        );

        // Append-only, whatever the application does.
        for sql in [
            "UPDATE audit_events SET outcome = 'OK'",
            "DELETE FROM audit_events",
        ] {
            let result = app.ctx.db.execute_unprepared(sql).await;
            ensure!(result.is_err(), "{sql} was allowed");
        }
        ensure!(events_of(&mut admin, &key_id, 4).await?.len() == 4);
        let _ = TEST_API_KEY;
        app.stop().await
    }
);

db_test!(
    a_revocation_reaches_another_replica_within_the_key_cache_time,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        // A second server on the same database: a replica with a key cache of its own.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let replica_addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let replica = tokio::spawn(sharpsend_server::serve(
            listener,
            app.ctx.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let replica_channel = Channel::from_shared(format!("http://{replica_addr}"))?
            .connect()
            .await?;

        let mut admin = app.admin().await?;
        let (key_id, secret) = create_key(&mut admin, "replicated", pb::Role::Reader).await?;
        let mut on_replica =
            SegmentServiceClient::with_interceptor(replica_channel, Bearer::new(Some(&secret)));
        on_replica
            .list_segments(pb::ListSegmentsRequest::default())
            .await?;

        admin
            .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
            .await?;
        let revoked_at = std::time::Instant::now();
        let limit = sharpsend_server::auth::KEY_CACHE_TTL + Duration::from_secs(1);
        loop {
            match on_replica
                .list_segments(pb::ListSegmentsRequest::default())
                .await
            {
                Err(status) if status.code() == Code::Unauthenticated => break,
                Err(status) => anyhow::bail!("replica answered {status:?}"),
                Ok(_) => {
                    ensure!(
                        revoked_at.elapsed() < limit,
                        "the replica still accepts the key {:?} after revocation",
                        revoked_at.elapsed()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = stop.send(());
        replica.await??;
        app.stop().await
    }
);
