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
use sharpsend_core::{AppContext, context::Migrations};
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
            pb::NewsletterDelivery {
                from_id: 0,
                ..Default::default()
            },
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
        // Customer.io holds the trigger a moment before processing it (it shows up late).
        let held = Duration::from_secs(4);
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::Delay(held)],
        );
        let mut client = app.campaigns().await?;
        let call = tokio::spawn(async move {
            client
                .send_assignment(broadcast_send("asg-died", &[(engaged, "<p>x</p>")]))
                .await
        });
        // The request is out (the simulator holds it: it took the second fault), the submission
        // is `submitting`...
        let sub = wait_for_state(&app, DbState::Submitting).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.sim.sim.queued_faults() > 0 {
            ensure!(
                std::time::Instant::now() < deadline,
                "the trigger never left"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...and its dispatcher is gone for us (the call is abandoned; in production: the process
        // is killed after its request reached Customer.io).
        call.abort();
        ensure!(sub.claimed_by.is_some());
        // Before the claim expires the reconciler leaves it alone.
        app.run_job(Job::SendReconcile).await?;
        let still = store::submission(&app.ctx.db, sub.id)
            .await?
            .context("row")?;
        ensure!(still.state == DbState::Submitting, "{still:?}");
        // The claim lapses while Customer.io has not shown the trigger yet: uncertain, and not
        // judged absent before the grace has passed since the END of the attempt window. (On a
        // slow machine the held request may already be answered: then it is simply settled.)
        app.advance(app.ctx.settings.sends.claim_ttl + Duration::from_millis(200));
        app.run_job(Job::SendReconcile).await?;
        let after = store::submission(&app.ctx.db, sub.id)
            .await?
            .context("row")?;
        ensure!(
            matches!(
                after.state,
                DbState::Uncertain | DbState::Submitted | DbState::Completed
            ) && after.attempts == 1,
            "{after:?}"
        );
        let send = store::get_by_id(&app.ctx.db, sub.send_id)
            .await?
            .context("send")?;
        // Customer.io processes the held request.
        let deadline = std::time::Instant::now() + held + Duration::from_secs(10);
        while our_triggers(&app, &send.public_id).is_empty() {
            ensure!(
                std::time::Instant::now() < deadline,
                "the held trigger never landed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        app.advance(app.ctx.settings.sends.reconcile_grace + Duration::from_secs(5));
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

/// Waits until some submission of the workspace is in `state`.
async fn wait_for_state(app: &TestApp, state: DbState) -> anyhow::Result<store::Submission> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let subs = store::in_state(&app.ctx.db, app.ctx.workspace_id(), state, 10).await?;
        if let Some(s) = subs.into_iter().next() {
            return Ok(s);
        }
        ensure!(std::time::Instant::now() < deadline, "never {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A second process on the same database and simulator, as the scheduler is to the server: an
/// application context with a Customer.io client of its own (reaching the simulator as
/// `localhost`, so its rate limiter is not the server's) and the same clock (so `advance` moves
/// both).
async fn second_process(app: &TestApp) -> anyhow::Result<AppContext> {
    let mut cio = sharpsend_tests::sim_settings(&app.sim);
    let port = url::Url::parse(&app.sim.base_url())?
        .port()
        .context("simulator port")?;
    let localhost = url::Url::parse(&format!("http://localhost:{port}"))?;
    cio.app_base_url = Some(localhost.clone());
    cio.track_base_url = Some(localhost);
    Ok(AppContext::bootstrap(
        sharpsend_tests::test_settings(&app.database_url, cio),
        Migrations::RequireCurrent,
        app.ctx.clock.clone(),
    )
    .await?)
}

/// The server's process-wide App API limiter.
fn server_limiter(
    app: &TestApp,
) -> anyhow::Result<std::sync::Arc<cio_client::limiter::RateLimiter>> {
    let base = url::Url::parse(&app.sim.base_url())?;
    Ok(cio_client::limiter::shared_limiter(
        cio_client::Api::App,
        &app.sim.sim.config().site_id,
        &base,
        10,
    ))
}

db_test!(
    a_trigger_held_in_one_process_limiter_past_its_claim_never_leaves_after_another_process_sent_it,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let scheduler = second_process(&app).await?;
        let sends = app.ctx.settings.sends.clone();
        // A 429 paused the server's triggers (its limiter is process-wide) for longer than the
        // claim and the grace together.
        let paused = sends.claim_ttl + sends.reconcile_grace + Duration::from_secs(1);
        server_limiter(&app)?.pause_scope_for(cio_client::TRIGGER_SCOPE, paused);

        let mut client = app.campaigns().await?;
        let call = tokio::spawn(async move {
            client
                .send_assignment(broadcast_send("asg-held", &[(engaged, "<p>x</p>")]))
                .await
        });
        // The server recorded the send and claimed its submission.
        let ws = app.ctx.workspace_id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let send = loop {
            if let Some(send) = store::get_by_key(&app.ctx.db, ws, "asg-held", "").await?
                && store::history(&app.ctx.db, send.id)
                    .await?
                    .iter()
                    .any(|h| h.to_state == DbState::Submitting)
            {
                break send;
            }
            ensure!(std::time::Instant::now() < deadline, "never claimed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        // Time passes beyond the claim and the grace; the scheduler reconciles and dispatches.
        app.advance(paused);
        sharpsend_core::jobs::run_job(&scheduler, Job::SendReconcile, "scheduler").await?;
        sharpsend_core::jobs::run_job(&scheduler, Job::SendDispatch, "scheduler").await?;
        // The server's call ends: its limiter lets the trigger go, or it gave up long before.
        let answered = tokio::time::timeout(paused + Duration::from_secs(15), call).await;
        ensure!(answered.is_ok(), "the server's call never ended");

        let done = wait_for(&app, &send.public_id, "sent once", |s| {
            matches!(
                states(s)[..],
                [SendState::Submitted] | [SendState::Completed]
            )
        })
        .await?;
        let triggers = our_triggers(&app, &send.public_id);
        ensure!(
            triggers.len() == 1,
            "{} triggers: {:#?}",
            triggers.len(),
            done.history
        );
        ensure!(done.submissions[0].cio_trigger_id == triggers[0].id);
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

        // Found unsent: within the grace after the attempt it is left alone (a send of it could
        // still be on its way), then sent.
        app.run_job(Job::SendReconcile).await?;
        let waiting = get_send(&app, &send.id).await?;
        ensure!(
            states(&waiting) == [SendState::Uncertain],
            "{:#?}",
            waiting.history
        );
        app.advance(app.ctx.settings.sends.reconcile_grace + Duration::from_secs(1));
        app.run_job(Job::SendReconcile).await?;
        let sent = wait_for(&app, &send.id, "sent", |s| {
            matches!(
                states(s)[..],
                [SendState::Submitted] | [SendState::Completed]
            )
        })
        .await?;
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

/// `POST /v1/newsletters/{id}/send` requests the simulator received.
fn newsletter_sends(app: &TestApp, newsletter_id: i64) -> usize {
    let path = format!("/v1/newsletters/{newsletter_id}/send");
    app.sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .count()
}

/// Waits until the simulator holds a newsletter created after the first `before`.
async fn wait_for_newsletter(
    app: &TestApp,
    before: usize,
) -> anyhow::Result<cio_sim::SimNewsletter> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let all = app.sim.sim.newsletters();
        if all.len() > before {
            return all.into_iter().max_by_key(|n| n.id).context("newsletter");
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no newsletter created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

db_test!(
    a_newsletter_created_after_its_dispatcher_lost_the_claim_is_not_sent_by_that_dispatcher,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let before = app.sim.sim.newsletters().len();
        // Customer.io creates the newsletter at once but its answer takes a while.
        let slow = Duration::from_secs(3);
        app.sim
            .sim
            .push_faults(Some(SimApi::App), [Fault::AcceptThenDelay(slow)]);
        let mut client = app.campaigns().await?;
        let call = tokio::spawn(async move {
            client
                .send_assignment(newsletter_send("asg-news-late", &[(engaged, "<p>x</p>")]))
                .await
        });
        let newsletter = wait_for_newsletter(&app, before).await?;
        // Meanwhile the claim lapses and the reconciler takes over: it finds the newsletter by
        // its name, unsent, and (after the grace) sends it.
        let sends = &app.ctx.settings.sends;
        app.advance(sends.claim_ttl + sends.reconcile_grace + Duration::from_secs(5));
        app.run_job(Job::SendReconcile).await?;
        // The first dispatcher hears of its creation only now.
        let answered = tokio::time::timeout(slow + Duration::from_secs(15), call).await;
        ensure!(answered.is_ok(), "the call never ended");

        let ws = app.ctx.workspace_id();
        let send = store::get_by_key(&app.ctx.db, ws, "asg-news-late", "")
            .await?
            .context("send")?;
        let done = wait_for(&app, &send.public_id, "sent", |s| {
            matches!(
                states(s)[..],
                [SendState::Submitted] | [SendState::Completed]
            )
        })
        .await?;
        ensure!(
            newsletter_sends(&app, newsletter.id) == 1,
            "{} sends of newsletter {}: {:#?}",
            newsletter_sends(&app, newsletter.id),
            newsletter.id,
            done.history
        );
        ensure!(app.sim.sim.newsletters().len() == before + 1);
        ensure!(
            app.sim
                .sim
                .newsletter(newsletter.id)
                .is_some_and(|n| n.sent_at.is_some())
        );
        app.stop().await
    }
);

db_test!(
    a_slow_newsletter_send_found_unsent_is_given_the_grace_and_sent_once,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let before = app.sim.sim.newsletters().len();
        // Created at once; the send is held by Customer.io a moment before it is processed.
        let held = Duration::from_secs(2);
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::Delay(held)],
        );
        let mut client = app.campaigns().await?;
        let call = tokio::spawn(async move {
            client
                .send_assignment(newsletter_send("asg-news-slow", &[(engaged, "<p>x</p>")]))
                .await
        });
        let newsletter = wait_for_newsletter(&app, before).await?;
        // The send is in the simulator (it took the second fault) and held there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.sim.sim.queued_faults() > 0 {
            ensure!(std::time::Instant::now() < deadline, "send never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The caller gives up; the server's dispatch goes on.
        drop(call);
        // The claim lapses while the send is still held: the newsletter is found, unsent. That is
        // not proof it will not go out: it is left alone within the grace.
        app.advance(app.ctx.settings.sends.claim_ttl + Duration::from_millis(200));
        app.run_job(Job::SendReconcile).await?;
        let ws = app.ctx.workspace_id();
        let send = store::get_by_key(&app.ctx.db, ws, "asg-news-slow", "")
            .await?
            .context("send")?;
        let waiting = get_send(&app, &send.public_id).await?;
        ensure!(
            states(&waiting) == [SendState::Uncertain],
            "{:#?}",
            waiting.history
        );
        // Customer.io processes the held send.
        let deadline = std::time::Instant::now() + held + Duration::from_secs(10);
        while app
            .sim
            .sim
            .newsletter(newsletter.id)
            .is_none_or(|n| n.sent_at.is_none())
        {
            ensure!(std::time::Instant::now() < deadline, "never sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        app.advance(app.ctx.settings.sends.reconcile_grace + Duration::from_secs(5));
        app.run_job(Job::SendReconcile).await?;
        let done = wait_for(&app, &send.public_id, "found sent", |s| {
            matches!(
                states(s)[..],
                [SendState::Submitted] | [SendState::Completed]
            )
        })
        .await?;
        ensure!(
            newsletter_sends(&app, newsletter.id) == 1,
            "{} sends: {:#?}",
            newsletter_sends(&app, newsletter.id),
            done.history
        );
        app.stop().await
    }
);

db_test!(
    a_mark_sent_that_loses_to_a_requeue_is_reported_as_aborted,
    |db: TestDatabase| async move {
        use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::AcceptThenDrop],
        );
        let send = app
            .campaigns()
            .await?
            .send_assignment(broadcast_send("asg-race", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner()
            .send
            .context("send")?;
        ensure!(send.state() == SendState::Uncertain, "{send:#?}");
        let ws = app.ctx.workspace_id();
        let sub = store::in_state(&app.ctx.db, ws, DbState::Uncertain, 1)
            .await?
            .into_iter()
            .next()
            .context("uncertain submission")?;

        // The reconciler is re-queueing it right now: its write holds the row (uncommitted)...
        let other = sharpsend_db::connect(&app.database_url).await?;
        let requeue = other
            .begin_with_options(sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        requeue
            .execute_unprepared(&format!(
                "UPDATE send_submissions SET state = 'pending' WHERE id = {}",
                sub.id
            ))
            .await?;
        // ...while an operator marks it as sent: ResolveSend reads it uncertain, then waits for
        // the row.
        let mut campaigns = app.campaigns().await?;
        let send_id = send.id.clone();
        let resolve = tokio::spawn(async move {
            campaigns
                .resolve_send(pb::ResolveSendRequest {
                    send_id,
                    resolution: pb::Resolution::MarkSent as i32,
                    actor: "ops@sharpsend.example".into(),
                    reason: "seen in Customer.io".into(),
                    ..Default::default()
                })
                .await
        });
        // Long enough for ResolveSend to read and reach its write (a lock wait, not a timer).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        requeue.commit().await?;
        let answer = resolve.await?;
        let status = answer
            .err()
            .context("MarkSent answered OK after losing the race")?;
        ensure!(status.code() == Code::Aborted, "{status:?}");
        let now = store::submission(&app.ctx.db, sub.id)
            .await?
            .context("row")?;
        ensure!(now.state == DbState::Pending, "{now:?}");
        let history = store::history(&app.ctx.db, now.send_id).await?;
        ensure!(
            !history.iter().any(|h| h.actor == "ops@sharpsend.example"),
            "{history:?}"
        );
        app.stop().await
    }
);

/// An application context of its own on `app`'s database and simulator with `adjust`ed
/// settings, sharing `app`'s clock (core calls, no server).
async fn context_with(
    app: &TestApp,
    adjust: impl FnOnce(&mut sharpsend_core::settings::Settings),
) -> anyhow::Result<AppContext> {
    let mut settings =
        sharpsend_tests::test_settings(&app.database_url, sharpsend_tests::sim_settings(&app.sim));
    adjust(&mut settings);
    Ok(AppContext::bootstrap(settings, Migrations::RequireCurrent, app.ctx.clock.clone()).await?)
}

/// The body of each `POST /v1/newsletters` the simulator answered.
fn newsletter_creations(app: &TestApp) -> Vec<(u16, serde_json::Value)> {
    app.sim
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/newsletters")
        .map(|r| (r.status, r.body.unwrap_or_default()))
        .collect()
}

fn with_topic(mut request: pb::SendAssignmentRequest, topic: i64) -> pb::SendAssignmentRequest {
    request.delivery = Some(pb::send_assignment_request::Delivery::Newsletter(
        pb::NewsletterDelivery {
            from_id: 0,
            subscription_topic_id: Some(topic),
        },
    ));
    request
}

db_test!(
    a_subscription_center_workspace_gets_newsletters_with_the_configured_or_requested_topic,
    |db: TestDatabase| async move {
        let app = TestApp::spawn_with(&db, cio_sim::SimConfig::demo(), |cio| {
            cio.subscription_topic_id = Some(7);
        })
        .await?;
        app.run_job(Job::SegmentSync).await?;
        app.sim.sim.set_subscription_center(true);
        let engaged = segment(&app, "High Engagement")?;
        let mut campaigns = app.campaigns().await?;

        // The service's topic.
        let a = campaigns
            .send_assignment(newsletter_send("asg-topic-a", &[(engaged, "<p>a</p>")]))
            .await?
            .into_inner()
            .send
            .context("a")?;
        ensure!(states(&a) == [SendState::Submitted], "{a:#?}");
        // A send's own topic wins over it, and is shown on the send.
        let b = campaigns
            .send_assignment(with_topic(
                newsletter_send("asg-topic-b", &[(engaged, "<p>b</p>")]),
                9,
            ))
            .await?
            .into_inner()
            .send
            .context("b")?;
        ensure!(states(&b) == [SendState::Submitted], "{b:#?}");
        ensure!(
            matches!(
                b.delivery,
                Some(pb::send::Delivery::Newsletter(pb::NewsletterDelivery {
                    subscription_topic_id: Some(9),
                    ..
                }))
            ),
            "{:?}",
            b.delivery
        );
        let topics: Vec<_> = newsletter_creations(&app)
            .iter()
            .map(|(status, body)| (*status, body["subscription_topic_id"].as_i64()))
            .collect();
        ensure!(topics == [(200, Some(7)), (200, Some(9))], "{topics:?}");
        let bad = campaigns
            .send_assignment(with_topic(
                newsletter_send("asg-topic-bad", &[(engaged, "<p>x</p>")]),
                0,
            ))
            .await
            .err()
            .context("topic 0")?;
        ensure!(
            bad_request_fields(&bad) == ["newsletter.subscription_topic_id"],
            "{bad:?}"
        );
        app.stop().await?;

        // Without any topic, Customer.io refuses it: failed, with its reason.
        let app = synced(&db).await?;
        app.sim.sim.set_subscription_center(true);
        let engaged = segment(&app, "High Engagement")?;
        let c = app
            .campaigns()
            .await?
            .send_assignment(newsletter_send("asg-topic-none", &[(engaged, "<p>c</p>")]))
            .await?
            .into_inner()
            .send
            .context("c")?;
        ensure!(states(&c) == [SendState::Failed], "{c:#?}");
        ensure!(
            c.submissions[0]
                .error
                .contains("subscription_topic_id is required"),
            "{:?}",
            c.submissions[0].error
        );
        app.stop().await
    }
);

/// Adds a second running API-triggered broadcast to the simulator.
fn second_broadcast(app: &TestApp, segment_id: i64) -> anyhow::Result<i64> {
    Ok(app.sim.sim.add_broadcast(cio_sim::NewBroadcast::new(
        "Second alert",
        cio_sim::AudienceFilter::segment(segment_id),
    ))?)
}

fn triggers_refused(app: &TestApp) -> usize {
    app.sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.status == 429 && r.path.ends_with("/triggers"))
        .count()
}

fn to_broadcast(mut request: pb::SendAssignmentRequest, id: i64) -> pb::SendAssignmentRequest {
    request.delivery = Some(pb::send_assignment_request::Delivery::Broadcast(
        pb::BroadcastDelivery { broadcast_id: id },
    ));
    request
}

db_test!(
    triggers_of_two_broadcasts_are_spaced_workspace_wide_by_default,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let other = second_broadcast(&app, engaged)?;
        // Customer.io limits triggers across the workspace (the simulator's default).
        let mut campaigns = app.campaigns().await?;
        let a = campaigns
            .send_assignment(broadcast_send("asg-scope-a", &[(engaged, "<p>a</p>")]))
            .await?
            .into_inner()
            .send
            .context("a")?;
        let b = campaigns
            .send_assignment(to_broadcast(
                broadcast_send("asg-scope-b", &[(engaged, "<p>b</p>")]),
                other,
            ))
            .await?
            .into_inner()
            .send
            .context("b")?;
        ensure!(states(&a) == [SendState::Submitted], "{a:#?}");
        for id in [&a.id, &b.id] {
            wait_for(&app, id, "submitted", |s| {
                states(s) == [SendState::Submitted]
            })
            .await?;
        }
        ensure!(
            triggers_refused(&app) == 0,
            "{} triggers answered 429",
            triggers_refused(&app)
        );
        let mut times: Vec<_> = app
            .sim
            .sim
            .triggers(None)
            .iter()
            .map(|t| t.created_at)
            .collect();
        times.sort();
        ensure!(times.len() == 2);
        ensure!(
            (times[1] - times[0]).to_std()? >= sharpsend_tests::TEST_TRIGGER_INTERVAL,
            "{times:?}"
        );
        app.stop().await
    }
);

db_test!(
    per_broadcast_trigger_scope_lets_two_broadcasts_go_back_to_back,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        let other = second_broadcast(&app, engaged)?;
        app.sim
            .sim
            .set_trigger_scope(cio_sim::TriggerScope::PerBroadcast);
        let ctx = context_with(&app, |s| {
            s.sends.trigger_scope = sharpsend_core::sends::TriggerScope::Broadcast;
        })
        .await?;
        let request = |assignment: &str, broadcast_id: i64| sharpsend_core::sends::SendRequest {
            assignment_id: assignment.into(),
            request_id: String::new(),
            title: "Q4".into(),
            subject: "Q4 outlook".into(),
            segment_ids: vec![engaged],
            variations: vec![sharpsend_core::sends::Variation {
                segment_id: engaged,
                subject: String::new(),
                body: "<p>x</p>".into(),
                data: None,
            }],
            delivery: Some(sharpsend_core::sends::DeliveryMode::Broadcast { broadcast_id }),
            content_types: Vec::new(),
            created_by: "e2e".into(),
        };
        // Both go at once: neither waits for the other's window.
        for (assignment, broadcast) in [("asg-pb-a", BROADCAST), ("asg-pb-b", other)] {
            let (view, _) =
                sharpsend_core::sends::send_assignment(&ctx, request(assignment, broadcast))
                    .await?;
            ensure!(
                view.submissions[0].state == DbState::Submitted,
                "{assignment}: {view:#?}"
            );
        }
        ensure!(triggers_refused(&app) == 0);
        ensure!(app.sim.sim.triggers(None).len() == 2);
        app.stop().await
    }
);

db_test!(
    metrics_are_requested_and_bucketed_in_the_configured_time_zone,
    |db: TestDatabase| async move {
        // Kolkata is UTC+5:30: its hours start at half past UTC hours.
        let app = TestApp::spawn_with(&db, cio_sim::SimConfig::demo(), |cio| {
            cio.metrics_tz = "Asia/Kolkata".into();
        })
        .await?;
        app.run_job(Job::SegmentSync).await?;
        let engaged = segment(&app, "High Engagement")?;
        let send = app
            .campaigns()
            .await?
            .send_assignment(newsletter_send("asg-tz", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner()
            .send
            .context("send")?;
        let metrics = app
            .campaigns()
            .await?
            .get_campaign_metrics(pb::GetCampaignMetricsRequest {
                target: Some(pb::get_campaign_metrics_request::Target::SendId(
                    send.id.clone(),
                )),
                refresh: true,
            })
            .await?
            .into_inner();
        let asked: Vec<String> = app
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/metrics"))
            .filter_map(|r| r.query.clone())
            .collect();
        ensure!(
            !asked.is_empty() && asked.iter().all(|q| q.contains("tz=Asia%2FKolkata")),
            "{asked:?}"
        );
        let m = metrics;
        ensure!(m.resolution == "hours", "{m:?}");
        let start = m.series_start.context("series_start")?;
        ensure!(
            start.seconds.rem_euclid(3600) == 1800,
            "series start {start:?} is not a Kolkata hour"
        );
        app.stop().await
    }
);

db_test!(
    a_trigger_processed_with_errors_shows_them_on_the_send,
    |db: TestDatabase| async move {
        let app = synced(&db).await?;
        let engaged = segment(&app, "High Engagement")?;
        // Our trigger never arrives...
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [Fault::Delay(Duration::ZERO), Fault::Drop],
        );
        let send = app
            .campaigns()
            .await?
            .send_assignment(broadcast_send("asg-errors", &[(engaged, "<p>x</p>")]))
            .await?
            .into_inner()
            .send
            .context("send")?;
        ensure!(send.state() == SendState::Uncertain, "{send:#?}");
        // ...but one carrying its marker does (say another sender re-played it by hand) and
        // Customer.io processes it with errors: 25 of its recipients do not exist.
        let mut data = serde_json::Map::new();
        data.insert(
            "sharpsend_submission".into(),
            json!(send.submissions[0].marker),
        );
        let replay = cio_client::Trigger {
            recipients: cio_client::Recipients::Ids(
                (0..25).map(|i| format!("nobody-{i}")).collect(),
            ),
            data,
        };
        let _ = app.ctx.cio.trigger_broadcast(BROADCAST, &replay).await;
        let recorded = app.sim.sim.triggers(Some(BROADCAST));
        ensure!(
            recorded.len() == 1 && recorded[0].errors.len() == 25,
            "{recorded:?}"
        );

        app.run_job(Job::SendReconcile).await?;
        let done = get_send(&app, &send.id).await?;
        ensure!(states(&done) == [SendState::Completed], "{done:#?}");
        let sub = &done.submissions[0];
        ensure!(
            sub.trigger_error_count == 25 && sub.trigger_errors.len() == 20,
            "{} / {:?}",
            sub.trigger_error_count,
            sub.trigger_errors
        );
        ensure!(
            sub.trigger_errors[0].contains("nobody-0"),
            "{:?}",
            sub.trigger_errors[0]
        );
        ensure!(
            done.history
                .iter()
                .any(|h| h.reason.contains("25 error(s)")),
            "{:#?}",
            done.history
        );
        app.stop().await
    }
);

db_test!(
    a_process_whose_clock_is_off_from_the_database_refuses_to_start,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let clock = sharpsend_core::clock::Clock::adjustable();
        clock.advance(Duration::from_secs(60));
        let refused = AppContext::bootstrap(
            sharpsend_tests::test_settings(
                &app.database_url,
                sharpsend_tests::sim_settings(&app.sim),
            ),
            Migrations::RequireCurrent,
            clock,
        )
        .await
        .err()
        .context("a clock a minute ahead was accepted")?;
        let text = sharpsend_core::error::error_chain(&refused);
        ensure!(
            text.contains("SHARPSEND_MAX_CLOCK_SKEW_MS") && text.contains("ahead of"),
            "{text}"
        );
        app.stop().await
    }
);
