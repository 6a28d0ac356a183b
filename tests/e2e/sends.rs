//! CampaignService sends end to end: an approved assignment reaches Customer.io exactly once —
//! concurrent approvals, lost answers, requests that never arrived, dispatchers that died, 429s —
//! with one submission per target segment, and operators settle what cannot be settled
//! automatically.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use cio_sim::{Fault, SimApi};
use serde_json::json;
use sharpsend_core::jobs::Job;
use sharpsend_db::sends::{self as store, SendState as DbState};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, SendState};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;
use tonic_types::StatusExt;

/// The demo's API-triggered broadcast "Assignment Alert".
const BROADCAST: i64 = 3;

/// Demo segment id by name.
fn segment(app: &TestApp, name: &str) -> anyhow::Result<i64> {
    app.sim
        .sim
        .segments()
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.id)
        .with_context(|| format!("no demo segment {name}"))
}

async fn synced(db: &TestDatabase) -> anyhow::Result<TestApp> {
    let app = TestApp::spawn(db).await?;
    app.run_job(Job::SegmentSync).await?;
    Ok(app)
}

fn variation(segment_id: i64, body: &str) -> pb::ContentVariation {
    pb::ContentVariation {
        segment_id,
        body: body.to_string(),
        ..Default::default()
    }
}

fn broadcast_send(assignment: &str, targets: &[(i64, &str)]) -> pb::SendAssignmentRequest {
    pb::SendAssignmentRequest {
        assignment_id: assignment.to_string(),
        title: "Q4 Crypto Outlook".into(),
        subject: "Your Q4 outlook".into(),
        segment_ids: targets.iter().map(|(id, _)| *id).collect(),
        variations: targets
            .iter()
            .map(|(id, body)| variation(*id, body))
            .collect(),
        delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
            pb::BroadcastDelivery {
                broadcast_id: BROADCAST,
            },
        )),
        ..Default::default()
    }
}

fn newsletter_send(assignment: &str, targets: &[(i64, &str)]) -> pb::SendAssignmentRequest {
    pb::SendAssignmentRequest {
        delivery: Some(pb::send_assignment_request::Delivery::Newsletter(
            pb::NewsletterDelivery { from_id: 0 },
        )),
        ..broadcast_send(assignment, targets)
    }
}

async fn get_send(app: &TestApp, id: &str) -> anyhow::Result<pb::Send> {
    let r = app
        .campaigns()
        .await?
        .get_send(pb::GetSendRequest {
            send_id: id.into(),
            ..Default::default()
        })
        .await?;
    r.into_inner().send.context("no send")
}

/// Polls the send until `done` holds (background dispatch waits for trigger windows).
async fn wait_for(
    app: &TestApp,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Send) -> bool,
) -> anyhow::Result<pb::Send> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let send = get_send(app, id).await?;
        if done(&send) {
            return Ok(send);
        }
        if std::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}: {send:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn states(send: &pb::Send) -> Vec<SendState> {
    send.submissions.iter().map(|s| s.state()).collect()
}

fn our_triggers(app: &TestApp, send_id: &str) -> Vec<cio_sim::SimTrigger> {
    app.sim
        .sim
        .triggers(Some(BROADCAST))
        .into_iter()
        .filter(|t| {
            t.data
                .as_ref()
                .and_then(|d| d.get("send_id"))
                .and_then(|v| v.as_str())
                == Some(send_id)
        })
        .collect()
}

fn history_has(send: &pb::Send, from: SendState, to: SendState) -> bool {
    send.history
        .iter()
        .any(|h| h.from_state() == from && h.to_state() == to)
}

db_test!(
    same_assignment_approved_twice_at_once_triggers_once,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let growth = segment(&app, "High Engagement")?;
        let request = broadcast_send("asg-concurrent", &[(growth, "<p>The Q4 outlook</p>")]);
        let (mut a, mut b) = (app.campaigns().await?, app.campaigns().await?);
        let (ra, rb) = tokio::join!(
            a.send_assignment(request.clone()),
            b.send_assignment(request.clone())
        );
        let (ra, rb) = (ra?.into_inner(), rb?.into_inner());
        let (sa, sb) = (ra.send.context("send a")?, rb.send.context("send b")?);
        ensure!(sa.id == sb.id, "two sends: {} and {}", sa.id, sb.id);
        ensure!(
            ra.created != rb.created,
            "exactly one call creates it: {} {}",
            ra.created,
            rb.created
        );

        // And a third call later, the way a client retry would come.
        let again = app
            .campaigns()
            .await?
            .send_assignment(request)
            .await?
            .into_inner();
        ensure!(
            !again.created && again.send.as_ref().map(|s| s.id.as_str()) == Some(sa.id.as_str())
        );

        let send = wait_for(&app, &sa.id, "submitted", |s| {
            states(s) == [SendState::Submitted]
        })
        .await?;
        let triggers = our_triggers(&app, &sa.id);
        ensure!(triggers.len() == 1, "{} triggers", triggers.len());
        ensure!(app.sim.sim.triggers(Some(BROADCAST)).len() == 1);
        ensure!(send.submissions[0].cio_trigger_id == triggers[0].id);
        ensure!(send.created_by == "e2e", "created_by {}", send.created_by);

        // Customer.io processed it: reconciliation follows it to completed with its recipients.
        app.run_job(Job::SendReconcile).await?;
        let send = get_send(&app, &sa.id).await?;
        ensure!(send.state() == SendState::Completed, "{send:#?}");
        let expected = i64::try_from(triggers[0].recipients_count)?;
        ensure!(
            expected > 0 && send.recipients_count == Some(expected),
            "{:?} vs {expected}",
            send.recipients_count
        );
        app.stop().await
    }
);

db_test!(
    each_segment_gets_its_own_variation_once_and_nobody_gets_two,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let (engaged, premium, crypto) = (
            segment(&app, "High Engagement")?,
            segment(&app, "Premium Subscribers")?,
            segment(&app, "Crypto Enthusiasts")?,
        );
        let mut request = broadcast_send(
            "asg-variations",
            &[
                (engaged, "<p>engaged</p>"),
                (premium, "<p>premium</p>"),
                (crypto, "<p>crypto</p>"),
            ],
        );
        request.variations[1].subject = "Premium: your Q4 outlook".into();
        request.variations[2].data = Some(sharpsend_server::convert::json_to_struct(
            json!({"cta": "Read now"}).as_object().context("obj")?,
        ));
        let created = app
            .campaigns()
            .await?
            .send_assignment(request)
            .await?
            .into_inner();
        let id = created.send.context("send")?.id;
        let send = wait_for(&app, &id, "three submitted", |s| {
            states(s).iter().all(|st| *st == SendState::Submitted)
        })
        .await?;

        let triggers = our_triggers(&app, &id);
        ensure!(triggers.len() == 3, "{} triggers", triggers.len());
        // Spaced by the window: the simulator refused none.
        let refused = app
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.status == 429 && r.path.ends_with("/triggers"))
            .count();
        ensure!(refused == 0, "{refused} triggers answered 429");
        let mut everyone = HashSet::new();
        for (sub, body, segment_id) in [
            (0, "<p>engaged</p>", engaged),
            (1, "<p>premium</p>", premium),
            (2, "<p>crypto</p>", crypto),
        ] {
            let trigger = triggers
                .iter()
                .find(|t| t.id == send.submissions[sub].cio_trigger_id)
                .context("trigger of submission")?;
            let data = trigger.data.as_ref().context("data")?;
            ensure!(
                data["body"] == body && data["segment_id"] == segment_id,
                "{data}"
            );
            ensure!(data["sharpsend_submission"] == send.submissions[sub].marker.as_str());
            for person in &trigger.recipients {
                ensure!(
                    everyone.insert(person.clone()),
                    "{person} received two variations"
                );
            }
        }
        ensure!(triggers.iter().any(|t| {
            t.data
                .as_ref()
                .is_some_and(|d| d["subject"] == "Premium: your Q4 outlook")
        }));
        ensure!(
            triggers
                .iter()
                .any(|t| t.data.as_ref().is_some_and(|d| d["cta"] == "Read now"))
        );
        // Everyone in any target segment (with an email, subscribed) got exactly one.
        let members: HashSet<String> = [engaged, premium, crypto]
            .iter()
            .flat_map(|s| app.sim.sim.segment_members(*s).unwrap_or_default())
            .collect();
        let reachable: HashSet<String> = members
            .into_iter()
            .filter(|id| {
                app.sim.sim.person(id).is_some_and(|p| {
                    p.attributes.get("email").is_some()
                        && p.attributes.get("unsubscribed") != Some(&json!(true))
                })
            })
            .collect();
        ensure!(
            everyone == reachable,
            "{} recipients, {} reachable members",
            everyone.len(),
            reachable.len()
        );
        app.stop().await
    }
);

db_test!(
    a_lost_answer_is_reconciled_without_a_second_trigger,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        // The broadcast check passes; the trigger is processed and its answer dropped.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::AcceptThenDrop],
        );
        let created = app
            .campaigns()
            .await?
            .send_assignment(broadcast_send("asg-lost", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner();
        let send = created.send.context("send")?;
        ensure!(send.state() == SendState::Uncertain, "{send:#?}");
        ensure!(!send.submissions[0].error.is_empty());
        ensure!(
            our_triggers(&app, &send.id).len() == 1,
            "Customer.io did get it"
        );

        // No dispatcher sends an uncertain submission again.
        app.run_job(Job::SendDispatch).await?;
        ensure!(our_triggers(&app, &send.id).len() == 1);

        app.run_job(Job::SendReconcile).await?;
        let settled = get_send(&app, &send.id).await?;
        let trigger = &our_triggers(&app, &send.id)[0];
        ensure!(
            matches!(
                states(&settled)[..],
                [SendState::Submitted] | [SendState::Completed]
            ),
            "{settled:#?}"
        );
        ensure!(settled.submissions[0].cio_trigger_id == trigger.id);
        ensure!(settled.submissions[0].attempts == 1);
        ensure!(history_has(
            &settled,
            SendState::Uncertain,
            SendState::Submitted
        ));
        ensure!(settled.history.iter().any(|h| h.actor == "reconciler"));
        ensure!(app.sim.sim.triggers(Some(BROADCAST)).len() == 1);
        app.stop().await
    }
);

db_test!(
    a_request_that_never_arrived_is_settled_as_not_sent_and_goes_once,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::Drop],
        );
        let created = app
            .campaigns()
            .await?
            .send_assignment(broadcast_send("asg-dropped", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner();
        let send = created.send.context("send")?;
        ensure!(send.state() == SendState::Uncertain, "{send:#?}");
        ensure!(app.sim.sim.triggers(Some(BROADCAST)).is_empty());

        // Within the grace period nothing is decided.
        app.run_job(Job::SendReconcile).await?;
        let waiting = get_send(&app, &send.id).await?;
        ensure!(waiting.state() == SendState::Uncertain, "{waiting:#?}");

        app.advance(app.ctx.settings.sends.reconcile_grace);
        app.run_job(Job::SendReconcile).await?;
        let sent = wait_for(&app, &send.id, "sent after settling", |s| {
            states(s) == [SendState::Submitted]
        })
        .await?;
        ensure!(
            history_has(&sent, SendState::Uncertain, SendState::Pending),
            "{:#?}",
            sent.history
        );
        ensure!(our_triggers(&app, &send.id).len() == 1);
        ensure!(
            sent.submissions[0].attempts == 2,
            "attempts {}",
            sent.submissions[0].attempts
        );
        app.stop().await
    }
);

db_test!(
    a_dispatcher_that_died_mid_request_leaves_it_uncertain_then_settled,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        // Recorded but not dispatched: the broadcast window is held elsewhere for a moment.
        let ws = app.ctx.workspace_id();
        store::hold_window(&app.ctx.db, ws, BROADCAST, app.ctx.now()).await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [
                Fault::Delay(Duration::ZERO),
                Fault::Delay(Duration::from_secs(30)),
            ],
        );
        let mut client = app.campaigns().await?;
        let call = tokio::spawn(async move {
            client
                .send_assignment(broadcast_send("asg-died", &[(engaged, "<p>x</p>")]))
                .await
        });
        // The request is out (the simulator holds it), the submission is `submitting`...
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let sub = loop {
            let subs = store::in_state(&app.ctx.db, ws, DbState::Submitting, 10).await?;
            if let Some(s) = subs.into_iter().next() {
                break s;
            }
            ensure!(std::time::Instant::now() < deadline, "never submitting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // ...and its dispatcher dies (the call is abandoned; in production: the process is killed).
        call.abort();
        ensure!(sub.claimed_by.is_some());
        // Before the claim expires the reconciler leaves it alone.
        app.run_job(Job::SendReconcile).await?;
        let still = store::submission(&app.ctx.db, sub.id)
            .await?
            .context("row")?;
        ensure!(
            still.state == DbState::Submitting || still.state == DbState::Submitted,
            "{still:?}"
        );
        // The aborted call's request stays in the simulator until the delay ends: the simulator
        // then processes it (as Customer.io would). Move past the claim expiry.
        app.advance(app.ctx.settings.sends.claim_ttl + Duration::from_millis(200));
        app.run_job(Job::SendReconcile).await?;
        let after = store::submission(&app.ctx.db, sub.id)
            .await?
            .context("row")?;
        // Either the request reached the simulator (found → submitted) or it did not (uncertain
        // until the grace passes, then sent once); never two triggers.
        ensure!(
            matches!(
                after.state,
                DbState::Uncertain | DbState::Submitted | DbState::Completed | DbState::Pending
            ),
            "{after:?}"
        );
        let send = store::get_by_id(&app.ctx.db, sub.send_id)
            .await?
            .context("send")?;
        app.advance(app.ctx.settings.sends.reconcile_grace);
        app.run_job(Job::SendReconcile).await?;
        let done = wait_for(&app, &send.public_id, "settled", |s| {
            matches!(
                states(s)[..],
                [SendState::Submitted] | [SendState::Completed]
            )
        })
        .await?;
        ensure!(
            history_has(&done, SendState::Submitting, SendState::Uncertain),
            "{:#?}",
            done.history
        );
        ensure!(
            our_triggers(&app, &send.public_id).len() == 1,
            "{} triggers",
            our_triggers(&app, &send.public_id).len()
        );
        app.stop().await
    }
);

db_test!(
    a_429_on_a_trigger_waits_for_the_window_and_goes_once,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        // Someone else triggered the broadcast a moment ago: Customer.io's window is closed.
        app.sim.sim.set_trigger_interval(Duration::from_secs(2));
        let other = cio_client::Trigger {
            recipients: cio_client::Recipients::Filter(json!({"segment": {"id": engaged}})),
            data: serde_json::Map::new(),
        };
        app.ctx.cio.trigger_broadcast(BROADCAST, &other).await?;

        let created = app
            .campaigns()
            .await?
            .send_assignment(broadcast_send("asg-429", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner();
        let send = created.send.context("send")?;
        ensure!(
            send.state() == SendState::Pending,
            "queued, not failed: {send:#?}"
        );
        ensure!(
            send.submissions[0].next_attempt_at.is_some()
                && send.submissions[0].error.contains("rate limit"),
            "{send:#?}"
        );
        ensure!(
            send.submissions[0].attempts == 0,
            "a refused request is not an attempt"
        );

        let sent = wait_for(&app, &send.id, "sent after the window", |s| {
            states(s) == [SendState::Submitted]
        })
        .await?;
        ensure!(our_triggers(&app, &send.id).len() == 1);
        ensure!(
            app.sim.sim.triggers(Some(BROADCAST)).len() == 2,
            "the other trigger and ours"
        );
        let answered_429 = app
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.status == 429 && r.path.ends_with("/triggers"))
            .count();
        ensure!(
            answered_429 == 1,
            "one refusal, then it waited: {answered_429}"
        );
        ensure!(history_has(
            &sent,
            SendState::Submitting,
            SendState::Pending
        ));
        app.stop().await
    }
);

db_test!(
    newsletters_are_created_per_segment_and_sent_once,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let (engaged, premium) = (
            segment(&app, "High Engagement")?,
            segment(&app, "Premium Subscribers")?,
        );
        let before = app.sim.sim.newsletters().len();
        let created = app
            .campaigns()
            .await?
            .send_assignment(newsletter_send(
                "asg-news",
                &[(engaged, "<p>engaged</p>"), (premium, "<p>premium</p>")],
            ))
            .await?
            .into_inner();
        let send = created.send.context("send")?;
        // Newsletters have no trigger window: both go at once.
        ensure!(
            states(&send) == [SendState::Submitted, SendState::Submitted],
            "{send:#?}"
        );
        let newsletters = app.sim.sim.newsletters();
        ensure!(newsletters.len() == before + 2);
        let mut recipients = HashSet::new();
        for sub in &send.submissions {
            let n = app
                .sim
                .sim
                .newsletter(sub.cio_newsletter_id)
                .context("newsletter")?;
            ensure!(
                n.name.ends_with(&format!("[{}]", sub.marker)) && n.sent_at.is_some(),
                "{n:?}"
            );
            let deliveries = app
                .sim
                .sim
                .deliveries(&cio_sim::DeliveryFilter::newsletter(n.id));
            for d in deliveries {
                ensure!(
                    recipients.insert(d.person_id.clone()),
                    "{} got two newsletters",
                    d.person_id
                );
            }
        }
        app.run_job(Job::SendReconcile).await?;
        ensure!(get_send(&app, &send.id).await?.state() == SendState::Completed);
        app.stop().await
    }
);

db_test!(
    a_newsletter_whose_creation_answer_was_lost_is_found_by_name_and_sent_once,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let before = app.sim.sim.newsletters().len();
        app.sim
            .sim
            .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
        let created = app
            .campaigns()
            .await?
            .send_assignment(newsletter_send("asg-news-lost", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner();
        let send = created.send.context("send")?;
        ensure!(send.state() == SendState::Uncertain, "{send:#?}");
        ensure!(
            app.sim.sim.newsletters().len() == before + 1,
            "created, answer lost"
        );

        app.run_job(Job::SendReconcile).await?;
        let sent = get_send(&app, &send.id).await?;
        ensure!(
            matches!(
                states(&sent)[..],
                [SendState::Submitted] | [SendState::Completed]
            ),
            "{sent:#?}"
        );
        ensure!(
            app.sim.sim.newsletters().len() == before + 1,
            "not created twice"
        );
        let n = app
            .sim
            .sim
            .newsletter(sent.submissions[0].cio_newsletter_id)
            .context("newsletter")?;
        ensure!(n.sent_at.is_some());
        ensure!(
            history_has(&sent, SendState::Uncertain, SendState::Pending),
            "found as a draft, then sent: {:#?}",
            sent.history
        );
        app.stop().await
    }
);

db_test!(
    operators_resolve_uncertain_sends_with_who_and_why,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let mut campaigns = app.campaigns().await?;

        // Lost answer; the operator saw it in Customer.io's UI.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::AcceptThenDrop],
        );
        let a = campaigns
            .send_assignment(broadcast_send("asg-resolve-a", &[(engaged, "<p>a</p>")]))
            .await?
            .into_inner()
            .send
            .context("a")?;
        ensure!(a.state() == SendState::Uncertain);
        let bad = campaigns
            .resolve_send(pb::ResolveSendRequest {
                send_id: a.id.clone(),
                resolution: pb::Resolution::MarkSent as i32,
                ..Default::default()
            })
            .await
            .err()
            .context("no actor")?;
        ensure!(bad.code() == Code::InvalidArgument);
        ensure!(
            bad_request_fields(&bad) == ["actor", "reason"],
            "{:?}",
            bad_request_fields(&bad)
        );
        let resolved = campaigns
            .resolve_send(pb::ResolveSendRequest {
                send_id: a.id.clone(),
                resolution: pb::Resolution::MarkSent as i32,
                actor: "ops@sharpsend.example".into(),
                reason: "seen in the broadcast's trigger list".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .send
            .context("resolved")?;
        ensure!(states(&resolved) == [SendState::Submitted]);
        let entry = resolved.history.last().context("history")?;
        ensure!(
            entry.actor == "ops@sharpsend.example" && entry.reason.contains("trigger list"),
            "{entry:?}"
        );
        // Nothing uncertain any more.
        let again = campaigns
            .resolve_send(pb::ResolveSendRequest {
                send_id: a.id.clone(),
                resolution: pb::Resolution::AllowRetry as i32,
                actor: "ops".into(),
                reason: "oops".into(),
                ..Default::default()
            })
            .await
            .err()
            .context("not uncertain")?;
        ensure!(again.code() == Code::FailedPrecondition, "{again:?}");
        ensure!(our_triggers(&app, &a.id).len() == 1);

        // Never arrived; the operator allows one more attempt (after the first one's window).
        app.advance(app.ctx.settings.sends.trigger_spacing);
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::Drop],
        );
        let b = campaigns
            .send_assignment(broadcast_send("asg-resolve-b", &[(engaged, "<p>b</p>")]))
            .await?
            .into_inner()
            .send
            .context("b")?;
        ensure!(b.state() == SendState::Uncertain && our_triggers(&app, &b.id).is_empty());
        app.advance(app.ctx.settings.sends.trigger_spacing);
        campaigns
            .resolve_send(pb::ResolveSendRequest {
                send_id: b.id.clone(),
                segment_id: engaged,
                resolution: pb::Resolution::AllowRetry as i32,
                actor: "ops@sharpsend.example".into(),
                reason: "not in Customer.io".into(),
            })
            .await?;
        let retried = wait_for(&app, &b.id, "retried", |s| {
            states(s) == [SendState::Submitted]
        })
        .await?;
        ensure!(our_triggers(&app, &b.id).len() == 1);
        ensure!(
            retried
                .history
                .iter()
                .any(|h| h.actor == "ops@sharpsend.example" && h.to_state() == SendState::Pending)
        );

        let unknown = campaigns
            .resolve_send(pb::ResolveSendRequest {
                send_id: "snd_nope".into(),
                resolution: pb::Resolution::MarkSent as i32,
                actor: "ops".into(),
                reason: "x".into(),
                ..Default::default()
            })
            .await
            .err()
            .context("unknown")?;
        ensure!(unknown.code() == Code::NotFound);
        app.stop().await
    }
);

db_test!(
    a_reused_key_with_other_content_is_refused_and_a_new_request_id_sends_again,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let mut campaigns = app.campaigns().await?;
        let first = campaigns
            .send_assignment(broadcast_send("asg-key", &[(engaged, "<p>v1</p>")]))
            .await?
            .into_inner();
        let changed = campaigns
            .send_assignment(broadcast_send("asg-key", &[(engaged, "<p>v2</p>")]))
            .await
            .err()
            .context("conflict")?;
        ensure!(
            changed.code() == Code::AlreadyExists && changed.message().contains("request_id"),
            "{changed:?}"
        );

        let mut again = broadcast_send("asg-key", &[(engaged, "<p>v2</p>")]);
        again.request_id = "resend-1".into();
        let second = campaigns.send_assignment(again).await?.into_inner();
        ensure!(
            second.created
                && second.send.as_ref().map(|s| &s.id) != first.send.as_ref().map(|s| &s.id)
        );
        let second_id = second.send.context("second")?.id;
        wait_for(&app, &second_id, "second sent", |s| {
            states(s) == [SendState::Submitted]
        })
        .await?;

        // GetSend by key; ListSends by assignment, newest first, paged.
        let by_key = campaigns
            .get_send(pb::GetSendRequest {
                assignment_id: "asg-key".into(),
                request_id: "resend-1".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .send
            .context("by key")?;
        ensure!(by_key.id == second_id);
        let page = campaigns
            .list_sends(pb::ListSendsRequest {
                assignment_id: "asg-key".into(),
                page_size: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            page.sends.len() == 1
                && page.sends[0].id == second_id
                && !page.next_page_token.is_empty()
        );
        ensure!(page.sends[0].history.is_empty(), "lists carry no history");
        let rest = campaigns
            .list_sends(pb::ListSendsRequest {
                assignment_id: "asg-key".into(),
                page_size: 1,
                page_token: page.next_page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(rest.sends.len() == 1 && rest.next_page_token.is_empty());
        let pending = campaigns
            .list_sends(pb::ListSendsRequest {
                state: SendState::Pending as i32,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(pending.sends.is_empty(), "{:?}", pending.sends);
        let missing = campaigns
            .get_send(pb::GetSendRequest {
                send_id: "snd_missing".into(),
                ..Default::default()
            })
            .await
            .err()
            .context("missing")?;
        ensure!(missing.code() == Code::NotFound);
        app.stop().await
    }
);

fn precondition_subjects(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_precondition_failure()
        .map(|p| {
            p.violations
                .into_iter()
                .map(|v| format!("{}: {}", v.subject, v.description))
                .collect()
        })
        .unwrap_or_default()
}

db_test!(
    bad_sends_get_clear_errors_and_send_nothing,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let mut campaigns = app.campaigns().await?;

        let unknown_segment = campaigns
            .send_assignment(broadcast_send(
                "asg-bad-1",
                &[(engaged, "<p>x</p>"), (9999, "<p>y</p>")],
            ))
            .await
            .err()
            .context("unknown segment")?;
        ensure!(
            unknown_segment.code() == Code::FailedPrecondition,
            "{unknown_segment:?}"
        );
        let reasons = precondition_subjects(&unknown_segment);
        ensure!(
            reasons.len() == 1 && reasons[0].starts_with("segment_ids[1]: segment 9999"),
            "{reasons:?}"
        );

        let empty = app
            .sim
            .sim
            .segments()
            .into_iter()
            .find(|s| {
                app.sim
                    .sim
                    .segment_members(s.id)
                    .is_some_and(|m| m.is_empty())
            })
            .context("an empty demo segment")?;
        let empty_refused = campaigns
            .send_assignment(broadcast_send("asg-bad-2", &[(empty.id, "<p>x</p>")]))
            .await
            .err()
            .context("empty segment")?;
        ensure!(
            empty_refused.code() == Code::FailedPrecondition
                && empty_refused.message().contains("no members"),
            "{empty_refused:?}"
        );

        let no_content = campaigns
            .send_assignment(broadcast_send("asg-bad-3", &[(engaged, "   ")]))
            .await
            .err()
            .context("empty content")?;
        ensure!(
            no_content.code() == Code::InvalidArgument
                && bad_request_fields(&no_content) == ["variations[0].body"],
            "{no_content:?}"
        );

        let mut long_subject = broadcast_send("asg-bad-4", &[(engaged, "<p>x</p>")]);
        long_subject.subject = "S".repeat(251);
        let too_long = campaigns
            .send_assignment(long_subject)
            .await
            .err()
            .context("long subject")?;
        ensure!(
            too_long.code() == Code::InvalidArgument
                && bad_request_fields(&too_long) == ["subject"],
            "{too_long:?}"
        );

        let mut unknown_broadcast = broadcast_send("asg-bad-5", &[(engaged, "<p>x</p>")]);
        unknown_broadcast.delivery = Some(pb::send_assignment_request::Delivery::Broadcast(
            pb::BroadcastDelivery {
                broadcast_id: 424242,
            },
        ));
        let not_found = campaigns
            .send_assignment(unknown_broadcast)
            .await
            .err()
            .context("unknown broadcast")?;
        ensure!(
            not_found.code() == Code::NotFound && not_found.message().contains("424242"),
            "{not_found:?}"
        );

        let mut draft = broadcast_send("asg-bad-6", &[(engaged, "<p>x</p>")]);
        draft.delivery = Some(pb::send_assignment_request::Delivery::Broadcast(
            pb::BroadcastDelivery { broadcast_id: 5 },
        ));
        let inactive = campaigns
            .send_assignment(draft)
            .await
            .err()
            .context("draft broadcast")?;
        ensure!(
            inactive.code() == Code::FailedPrecondition
                && inactive.message().contains("not active"),
            "{inactive:?}"
        );

        let mut no_delivery = broadcast_send("asg-bad-7", &[(engaged, "<p>x</p>")]);
        no_delivery.delivery = None;
        no_delivery.assignment_id = String::new();
        let missing = campaigns
            .send_assignment(no_delivery)
            .await
            .err()
            .context("no delivery")?;
        ensure!(
            bad_request_fields(&missing) == ["assignment_id", "delivery"],
            "{:?}",
            bad_request_fields(&missing)
        );

        ensure!(
            app.sim.sim.triggers(None).is_empty(),
            "nothing was triggered"
        );
        let sends = campaigns
            .list_sends(pb::ListSendsRequest::default())
            .await?
            .into_inner()
            .sends;
        ensure!(sends.is_empty(), "nothing was recorded: {sends:?}");
        let bad_page = campaigns
            .list_sends(pb::ListSendsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await
            .err()
            .context("page")?;
        ensure!(bad_request_fields(&bad_page) == ["page_token"]);
        app.stop().await
    }
);

db_test!(
    a_caller_that_gives_up_does_not_cut_the_send_off,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        // Customer.io takes its time to answer the trigger; the caller stops waiting long before.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [
                Fault::Delay(Duration::ZERO),
                Fault::AcceptThenDelay(Duration::from_millis(1500)),
            ],
        );
        let mut request =
            tonic::Request::new(broadcast_send("asg-impatient", &[(engaged, "<p>x</p>")]));
        request.set_timeout(Duration::from_millis(300));
        let gave_up = app
            .campaigns()
            .await?
            .send_assignment(request)
            .await
            .err()
            .context("answered in time")?;
        ensure!(
            matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{gave_up:?}"
        );

        let ws = app.ctx.workspace_id();
        let send = store::get_by_key(&app.ctx.db, ws, "asg-impatient", "")
            .await?
            .context("recorded")?;
        // The request went on in the server: settled as soon as Customer.io answered, well before a
        // dead dispatcher's claim would have lapsed.
        let settled = wait_for(&app, &send.public_id, "submitted", |s| {
            states(s) == [SendState::Submitted]
        })
        .await?;
        ensure!(
            !settled
                .history
                .iter()
                .any(|h| h.to_state() == SendState::Uncertain),
            "{:#?}",
            settled.history
        );
        ensure!(our_triggers(&app, &send.public_id).len() == 1);
        app.stop().await
    }
);
