//! `criteria_sql`: the same typed semantics on SQLite and PostgreSQL, over JSON-typed values
//! (written by SharpSend) and strings (imported from Customer.io) alike.

use std::collections::BTreeSet;

use serde_json::json;
use sharpsend_db::criteria_sql::{self, Comparison, Filter, TextOp};
use sharpsend_db::managed_segments;
use sharpsend_db::profiles::{self, FetchedProfile};
use sharpsend_db::testing::{TestDatabase, TestResult};

use crate::helpers::{attrs, ts, workspace};

fn person(id: &str, a: serde_json::Value) -> FetchedProfile {
    FetchedProfile {
        customer_id: id.to_owned(),
        email: Some(format!("{id}@example.com")),
        cio_id: None,
        attributes: attrs(a),
        cio_segments: None,
    }
}

fn text(attribute: &str, op: TextOp, value: &str) -> Filter {
    Filter::Text {
        attribute: attribute.into(),
        op,
        value: value.into(),
    }
}

fn number(attribute: &str, op: Comparison, value: f64) -> Filter {
    Filter::Number {
        attribute: attribute.into(),
        op,
        value,
    }
}

async fn matching(
    db: &TestDatabase,
    ws: i64,
    filter: &Filter,
) -> Result<BTreeSet<String>, Box<dyn std::error::Error + Send + Sync>> {
    let page = criteria_sql::matching_page(&db.conn, ws, filter, None, 1000).await?;
    let ids: BTreeSet<String> = page.into_iter().map(|p| p.customer_id).collect();
    let count = criteria_sql::count_matching(&db.conn, ws, filter).await?;
    assert_eq!(
        count as usize,
        ids.len(),
        "count and listing disagree for {filter:?}"
    );
    Ok(ids)
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

sharpsend_db::db_test!(
    typed_conditions_match_json_values_and_customer_io_strings_alike,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let other = workspace(&db, "site-2").await?;
        let people = vec![
            // Written by SharpSend: JSON types.
            person(
                "n87",
                json!({"score": 87, "plan": "pro", "vip": true, "tags": ["crypto", "tech"], "created_at": 1_700_000_000}),
            ),
            person("n80", json!({"score": 80.0, "plan": "free", "vip": false})),
            // Imported from Customer.io: every value a string.
            person(
                "s87",
                json!({"score": "87", "plan": "pro", "vip": "true", "tags": "crypto, tech", "created_at": "1700000100"}),
            ),
            person(
                "s5e1",
                json!({"score": " 5e1 ", "plan": "premium", "vip": "false"}),
            ),
            // Values that are not numbers must simply not match (never raise).
            person(
                "bad",
                json!({"score": "eighty", "plan": 87, "vip": "yes", "tags": {"x": 1}}),
            ),
            person(
                "odd",
                json!({"score": "1e99999", "plan": ["pro"], "vip": 1}),
            ),
            person("zero", json!({"score": "0e99999"})),
            person("lead0", json!({"score": "007"})),
            person("negz", json!({"score": "-007", "plan": ""})),
            person("tab", json!({"score": "\t42", "plan": "12abc"})),
            person("nul", json!({"score": null, "plan": null})),
            person("none", json!({})),
        ];
        profiles::upsert_fetched(&db.conn, ws, &people, ts(0)).await?;
        // Another workspace's people never match.
        profiles::upsert_fetched(
            &db.conn,
            other,
            &[person("n87", json!({"score": 99}))],
            ts(0),
        )
        .await?;

        // "1e99999" overflows a double: SQLite reads infinity, PostgreSQL is made to agree.
        let gt80 = number("score", Comparison::Gt, 80.0);
        assert_eq!(matching(&db, ws, &gt80).await?, set(&["n87", "odd", "s87"]));
        assert_eq!(
            matching(&db, ws, &number("score", Comparison::Gte, 80.0)).await?,
            set(&["n80", "n87", "odd", "s87"])
        );
        assert_eq!(
            matching(&db, ws, &number("score", Comparison::Eq, 50.0)).await?,
            set(&["s5e1"])
        );
        assert_eq!(
            matching(&db, ws, &number("score", Comparison::Lt, 80.0)).await?,
            set(&["lead0", "s5e1", "zero"])
        );
        assert_eq!(
            matching(&db, ws, &number("score", Comparison::Lte, 80.0)).await?,
            set(&["lead0", "n80", "s5e1", "zero"])
        );
        assert_eq!(
            matching(&db, ws, &number("score", Comparison::Eq, 7.0)).await?,
            set(&["lead0"])
        );
        assert_eq!(
            matching(&db, ws, &number("plan", Comparison::Gte, 0.0)).await?,
            set(&["bad"])
        );
        let in_list = Filter::NumberIn {
            attribute: "score".into(),
            values: vec![87.0, 50.0],
        };
        assert_eq!(
            matching(&db, ws, &in_list).await?,
            set(&["n87", "s87", "s5e1"])
        );
        // Timestamps are Unix seconds, number or numeric string.
        let after = number("created_at", Comparison::Gte, 1_700_000_050.0);
        assert_eq!(matching(&db, ws, &after).await?, set(&["s87"]));

        // Text conditions match strings only (87 the number is not "87" the text).
        let pro = text("plan", TextOp::Compare(Comparison::Eq), "pro");
        assert_eq!(matching(&db, ws, &pro).await?, set(&["n87", "s87"]));
        assert_eq!(
            matching(
                &db,
                ws,
                &text("plan", TextOp::Compare(Comparison::Eq), "87")
            )
            .await?,
            set(&[])
        );
        // Text that a bool or a list could also print as: only strings match.
        assert_eq!(
            matching(
                &db,
                ws,
                &text("vip", TextOp::Compare(Comparison::Eq), "true")
            )
            .await?,
            set(&["s87"])
        );
        assert_eq!(
            matching(
                &db,
                ws,
                &text("plan", TextOp::Compare(Comparison::Eq), "[\"pro\"]")
            )
            .await?,
            set(&[])
        );
        let bools_as_text = Filter::TextIn {
            attribute: "vip".into(),
            values: vec!["true".into(), "yes".into()],
        };
        assert_eq!(
            matching(&db, ws, &bools_as_text).await?,
            set(&["bad", "s87"])
        );
        assert_eq!(
            matching(
                &db,
                ws,
                &text("plan", TextOp::Compare(Comparison::Gt), "pre")
            )
            .await?,
            set(&["n87", "s87", "s5e1"])
        );
        assert_eq!(
            matching(
                &db,
                ws,
                &text("plan", TextOp::Compare(Comparison::Lt), "free")
            )
            .await?,
            set(&["negz", "tab"])
        );
        assert_eq!(
            matching(&db, ws, &text("plan", TextOp::StartsWith, "pr")).await?,
            set(&["n87", "s87", "s5e1"])
        );
        let text_in = Filter::TextIn {
            attribute: "plan".into(),
            values: vec!["free".into(), "premium".into(), "87".into()],
        };
        assert_eq!(matching(&db, ws, &text_in).await?, set(&["n80", "s5e1"]));
        // contains: substring of a string, element of an array.
        assert_eq!(
            matching(&db, ws, &text("tags", TextOp::Contains, "crypto")).await?,
            set(&["n87", "s87"])
        );
        assert_eq!(
            matching(&db, ws, &text("tags", TextOp::Contains, "tec")).await?,
            set(&["s87"])
        );

        // Booleans: JSON booleans and "true"/"false".
        let vip = Filter::Bool {
            attribute: "vip".into(),
            value: true,
        };
        assert_eq!(matching(&db, ws, &vip).await?, set(&["n87", "s87"]));
        let not_vip = Filter::Bool {
            attribute: "vip".into(),
            value: false,
        };
        assert_eq!(matching(&db, ws, &not_vip).await?, set(&["n80", "s5e1"]));

        // exists: present and not null.
        let plan_exists = Filter::Exists {
            attribute: "plan".into(),
        };
        assert_eq!(
            matching(&db, ws, &plan_exists).await?,
            set(&["bad", "n80", "n87", "negz", "odd", "s5e1", "s87", "tab"])
        );

        // not: exactly the complement, missing attributes included.
        let everyone = set(&[
            "bad", "lead0", "n80", "n87", "negz", "nul", "none", "odd", "s5e1", "s87", "tab",
            "zero",
        ]);
        let not_gt80 = Filter::Not(Box::new(gt80.clone()));
        let complement: BTreeSet<String> = everyone
            .difference(&matching(&db, ws, &gt80).await?)
            .cloned()
            .collect();
        assert_eq!(matching(&db, ws, &not_gt80).await?, complement);
        let nested = Filter::Not(Box::new(Filter::All(vec![
            pro.clone(),
            Filter::Not(Box::new(vip.clone())),
        ])));
        assert_eq!(matching(&db, ws, &nested).await?.len(), everyone.len());

        // Groups.
        let any = Filter::Any(vec![pro.clone(), number("score", Comparison::Eq, 50.0)]);
        assert_eq!(matching(&db, ws, &any).await?, set(&["n87", "s5e1", "s87"]));
        let all = Filter::All(vec![pro, gt80, vip]);
        assert_eq!(matching(&db, ws, &all).await?, set(&["n87", "s87"]));

        // Keys that need quoting, and a value that tries to break out of its string.
        let quoted = vec![person("q", json!({"first name": "O'Brien", "a.b": 1}))];
        profiles::upsert_fetched(&db.conn, ws, &quoted, ts(1)).await?;
        assert_eq!(
            matching(
                &db,
                ws,
                &text("first name", TextOp::Compare(Comparison::Eq), "O'Brien")
            )
            .await?,
            set(&["q"])
        );
        assert_eq!(
            matching(&db, ws, &number("a.b", Comparison::Eq, 1.0)).await?,
            set(&["q"])
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    segment_membership_is_an_exists_probe_of_the_mirrored_membership,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let people: Vec<FetchedProfile> = (0..10)
            .map(|i| person(&format!("p{i}"), json!({"score": i})))
            .collect();
        profiles::upsert_fetched(&db.conn, ws, &people, ts(0)).await?;
        let members: Vec<String> = vec![
            "p1".into(),
            "p2".into(),
            "p3".into(),
            "ghost".into(),
            "p2".into(),
        ];
        let stored =
            managed_segments::replace_mirrored_membership(&db.conn, ws, 42, &members, ts(5))
                .await?;
        assert_eq!(stored, Some(4));
        let synced = managed_segments::membership_synced_at(&db.conn, ws, &[42, 43]).await?;
        assert_eq!(synced.get(&42), Some(&ts(5)));
        assert!(!synced.contains_key(&43));

        let in_42 = Filter::InSegment { segment_id: 42 };
        assert_eq!(matching(&db, ws, &in_42).await?, set(&["p1", "p2", "p3"]));
        let both = Filter::All(vec![in_42.clone(), number("score", Comparison::Gte, 2.0)]);
        assert_eq!(matching(&db, ws, &both).await?, set(&["p2", "p3"]));
        let outside = Filter::Not(Box::new(in_42));
        assert_eq!(matching(&db, ws, &outside).await?.len(), 7);

        // A new read replaces the old one entirely.
        managed_segments::replace_mirrored_membership(&db.conn, ws, 42, &["p9".to_owned()], ts(6))
            .await?;
        assert_eq!(
            matching(&db, ws, &Filter::InSegment { segment_id: 42 }).await?,
            set(&["p9"])
        );
        TestResult::Ok(())
    }
);

/// `SELECT w.customer_id … WHERE <part>` over the workspace's profiles.
fn window_query(
    backend: sea_orm::DbBackend,
    ws: i64,
    part: impl FnOnce(&mut criteria_sql::SqlBuilder),
) -> criteria_sql::SqlBuilder {
    let mut b = criteria_sql::SqlBuilder::new(backend);
    b.sql("SELECT w.customer_id FROM profiles w WHERE w.workspace_id = ")
        .param(ws)
        .sql(" AND ");
    part(&mut b);
    b
}

// A relative-time condition's window is read through an index on the attribute's number
// (created by `ensure_time_index`, once), selects exactly what the window's filter selects,
// and an attribute name no index expression can hold falls back to the filter itself.
sharpsend_db::db_test!(
    time_windows_are_served_by_an_index_and_select_what_the_filter_selects,
    |db: TestDatabase| async move {
        use sea_orm::{ConnectionTrait, DbBackend, TransactionTrait};

        let ws = workspace(&db, "site-1").await?;
        let people = [
            person("a", json!({"seen_at": 1_000, "o'clock": 1_000})),
            person("b", json!({"seen_at": "1500", "o'clock": "1500"})),
            person("c", json!({"seen_at": 2_001, "o'clock": 2_001})),
            person("d", json!({"seen_at": "soon", "o'clock": null})),
            person("e", json!({"plan": "pro"})),
        ];
        profiles::upsert_fetched(&db.conn, ws, &people, ts(0)).await?;
        let backend = db.conn.get_database_backend();
        assert!(criteria_sql::ensure_time_index(&db.conn, "seen_at").await?);
        assert!(
            !criteria_sql::ensure_time_index(&db.conn, "seen_at").await?,
            "created once"
        );
        assert!(!criteria_sql::ensure_time_index(&db.conn, "o'clock").await?);

        for attribute in ["seen_at", "o'clock"] {
            let window = criteria_sql::TimeWindow {
                attribute: attribute.into(),
                from: 999.0,
                to: 2_000.0,
            };
            let ids = |b: criteria_sql::SqlBuilder| {
                let conn = db.conn.clone();
                async move {
                    let rows = conn.query_all_raw(b.build()).await?;
                    let mut out = BTreeSet::new();
                    for row in rows {
                        out.insert(row.try_get::<String>("", "customer_id")?);
                    }
                    Ok::<_, sea_orm::DbErr>(out)
                }
            };
            let by_window = ids(window_query(backend, ws, |b| {
                b.time_window(&window, "w");
            }))
            .await?;
            let by_filter = ids(window_query(backend, ws, |b| {
                b.filter(&window.filter(), "w");
            }))
            .await?;
            assert_eq!(by_window, set(&["a", "b"]), "{attribute}");
            assert_eq!(by_window, by_filter, "{attribute}");

            // The plan reads the attribute's index (PostgreSQL: whenever it can be used at all;
            // the table is too small for the planner to prefer it on its own).
            let txn = db.conn.begin().await?;
            let explain = if backend == DbBackend::Postgres {
                txn.execute_unprepared("SET LOCAL enable_seqscan = off")
                    .await?;
                "EXPLAIN "
            } else {
                "EXPLAIN QUERY PLAN "
            };
            let mut b = criteria_sql::SqlBuilder::new(backend);
            b.sql(explain);
            let query = window_query(backend, ws, |q| {
                q.time_window(&window, "w");
            });
            let statement = query.build();
            let mut stmt = statement.clone();
            stmt.sql = format!("{explain}{}", statement.sql);
            let mut plan = String::new();
            for row in txn.query_all_raw(stmt).await? {
                let line: String = if backend == DbBackend::Postgres {
                    row.try_get("", "QUERY PLAN")?
                } else {
                    row.try_get("", "detail")?
                };
                plan.push_str(&line);
                plan.push('\n');
            }
            txn.rollback().await?;
            // The window bounds the index scan itself (not only the workspace prefix).
            let bounded = plan
                .lines()
                .any(|l| l.contains("Index Cond") && l.contains("numbers ->"))
                || (plan.contains("ix_profiles_time_")
                    && plan.contains("workspace_id=? AND <expr>"));
            assert_eq!(bounded, attribute == "seen_at", "{attribute}: {plan}");
        }
        TestResult::Ok(())
    }
);
