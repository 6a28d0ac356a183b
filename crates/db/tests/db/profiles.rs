use serde_json::json;
use sharpsend_db::outbox::{self, NewAttributeUpdate};
use sharpsend_db::profiles::{self, FetchedProfile, Lookup, Profile, ProfileSegment};
use sharpsend_db::testing::{TestDatabase, TestResult};

use crate::helpers::{attrs, ts, workspace};

fn fetched(
    customer_id: &str,
    email: Option<&str>,
    cio_id: &str,
    a: serde_json::Value,
) -> FetchedProfile {
    FetchedProfile {
        customer_id: customer_id.to_owned(),
        email: email.map(str::to_owned),
        cio_id: Some(cio_id.to_owned()),
        attributes: attrs(a),
        cio_segments: None,
    }
}

sharpsend_db::db_test!(
    upsert_fetched_replaces_and_lookups_find_by_id_email_and_cio_id,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let ws2 = workspace(&db, "site-2").await?;

        let segments = vec![
            ProfileSegment {
                id: 7,
                name: "Growth Investors".into(),
            },
            ProfileSegment {
                id: 9,
                name: "Crypto".into(),
            },
        ];
        let batch = vec![
            FetchedProfile {
                cio_segments: Some(segments.clone()),
                ..fetched(
                    "alice",
                    Some("Alice@Example.com"),
                    "cio_a",
                    json!({"first_name": "Alice", "plan": "free", "score": 1.5}),
                )
            },
            fetched("élodie", Some("ÉLODIE@Example.FR"), "cio_e", json!({})),
            // Listed twice: the last entry wins.
            fetched("bob", None, "cio_old", json!({"v": 1})),
            fetched("bob", None, "cio_b", json!({"v": 2})),
        ];
        assert_eq!(profiles::upsert_fetched(c, ws, &batch, ts(10)).await?, 3);

        let alice = profiles::get(c, ws, Lookup::Id("alice"))
            .await?
            .ok_or("alice missing")?;
        assert_eq!(
            alice,
            Profile {
                workspace_id: ws,
                customer_id: "alice".into(),
                email: Some("Alice@Example.com".into()),
                cio_id: Some("cio_a".into()),
                attributes: attrs(json!({"first_name": "Alice", "plan": "free", "score": 1.5})),
                cio_segments: Some(segments),
                updated_at: ts(10),
                fetched_at: Some(ts(10)),
            }
        );
        // Email lookup is case-insensitive (Unicode); cio_id and id are exact.
        for email in [
            "alice@example.com",
            "ALICE@EXAMPLE.COM",
            "Alice@Example.com",
        ] {
            let found = profiles::get(c, ws, Lookup::Email(email)).await?;
            assert_eq!(
                found.map(|p| p.customer_id).as_deref(),
                Some("alice"),
                "{email}"
            );
        }
        let elodie = profiles::get(c, ws, Lookup::Email("élodie@example.fr")).await?;
        assert_eq!(elodie.map(|p| p.customer_id).as_deref(), Some("élodie"));
        let bob = profiles::get(c, ws, Lookup::CioId("cio_b"))
            .await?
            .ok_or("bob missing")?;
        assert_eq!(
            (
                bob.customer_id.as_str(),
                &bob.attributes,
                bob.email,
                bob.cio_segments
            ),
            ("bob", &attrs(json!({"v": 2})), None, None)
        );
        assert_eq!(profiles::get(c, ws, Lookup::CioId("cio_old")).await?, None);
        assert_eq!(profiles::get(c, ws, Lookup::CioId("CIO_B")).await?, None);
        assert_eq!(profiles::get(c, ws, Lookup::Id("ALICE")).await?, None);
        assert_eq!(profiles::get(c, ws2, Lookup::Id("alice")).await?, None);
        assert_eq!(
            profiles::get(c, ws2, Lookup::Email("alice@example.com")).await?,
            None
        );

        // A local write merges into the mirror...
        outbox::accept_attribute_updates(
            c,
            ws,
            &[NewAttributeUpdate {
                customer_id: "alice".into(),
                attributes: attrs(json!({"plan": "pro", "email": "alice@new.example"})),
            }],
            ts(20),
        )
        .await?;
        let alice = profiles::get(c, ws, Lookup::Email("ALICE@new.example"))
            .await?
            .ok_or("alice missing by new email")?;
        assert_eq!(
            alice.attributes,
            attrs(
                json!({"first_name": "Alice", "plan": "pro", "score": 1.5, "email": "alice@new.example"})
            )
        );
        assert_eq!((alice.updated_at, alice.fetched_at), (ts(20), Some(ts(10))));
        assert_eq!(
            alice.cio_id.as_deref(),
            Some("cio_a"),
            "kept by a local write"
        );

        // ...and the next import replaces attributes with what Customer.io holds.
        let again = vec![FetchedProfile {
            cio_segments: Some(vec![]),
            ..fetched(
                "alice",
                Some("alice@new.example"),
                "cio_a",
                json!({"plan": "pro"}),
            )
        }];
        assert_eq!(profiles::upsert_fetched(c, ws, &again, ts(30)).await?, 1);
        let alice = profiles::get(c, ws, Lookup::Id("alice"))
            .await?
            .ok_or("alice missing")?;
        assert_eq!(alice.attributes, attrs(json!({"plan": "pro"})));
        assert_eq!(alice.cio_segments, Some(vec![]));
        assert_eq!((alice.updated_at, alice.fetched_at), (ts(30), Some(ts(30))));
        assert_eq!(
            profiles::get(c, ws, Lookup::Email("alice@example.com")).await?,
            None
        );

        assert_eq!(profiles::upsert_fetched(c, ws, &[], ts(40)).await?, 0);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    upsert_fetched_writes_hundreds_at_once_or_nothing,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let many: Vec<FetchedProfile> = (0..1_234)
            .map(|i| {
                fetched(
                    &format!("person-{i:05}"),
                    Some(&format!("Person{i}@Example.com")),
                    &format!("cio-{i}"),
                    json!({"n": i}),
                )
            })
            .collect();
        assert_eq!(profiles::upsert_fetched(c, ws, &many, ts(0)).await?, 1_234);
        let last = profiles::get(c, ws, Lookup::Email("person1233@example.com"))
            .await?
            .ok_or("last missing")?;
        assert_eq!(last.attributes, attrs(json!({"n": 1233})));

        // A customer_id over 150 bytes (here 76 two-byte characters) fails the whole call.
        let mut bad = many.clone();
        for p in &mut bad {
            p.attributes = attrs(json!({"n": "changed"}));
        }
        bad[600].customer_id = "é".repeat(76);
        assert!(profiles::upsert_fetched(c, ws, &bad, ts(5)).await.is_err());
        let first = profiles::get(c, ws, Lookup::Id("person-00000"))
            .await?
            .ok_or("first missing")?;
        assert_eq!(first.attributes, attrs(json!({"n": 0})), "rolled back");
        assert_eq!(first.fetched_at, Some(ts(0)));
        // 150 bytes is fine, and so are 150 one-byte characters.
        let edge = vec![
            fetched(&"é".repeat(75), None, "x1", json!({})),
            fetched(&"a".repeat(150), None, "x2", json!({})),
        ];
        assert_eq!(profiles::upsert_fetched(c, ws, &edge, ts(6)).await?, 2);
        let empty_id = vec![fetched("", None, "x3", json!({}))];
        assert!(
            profiles::upsert_fetched(c, ws, &empty_id, ts(6))
                .await
                .is_err()
        );
        TestResult::Ok(())
    }
);

/// `SELECT COUNT(*) AS n …` with `$1`, `$2` parameters (`?1`, `?2` on SQLite).
async fn count(
    db: &TestDatabase,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<i64, sharpsend_db::DbError> {
    use sea_orm::{ConnectionTrait, Statement};
    let backend = db.conn.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => sql.to_string(),
        _ => sql.replace('$', "?"),
    };
    let row = db
        .conn
        .query_one_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(row
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .unwrap_or(0))
}

/// How many change-log rows (`profile_changes`, issue #18) the workspace has for `customer_id`.
async fn logged(
    db: &TestDatabase,
    ws: i64,
    customer_id: &str,
) -> Result<i64, sharpsend_db::DbError> {
    count(
        db,
        "SELECT COUNT(*) AS n FROM profile_changes WHERE workspace_id = $1 AND customer_id = $2",
        vec![ws.into(), customer_id.into()],
    )
    .await
}

sharpsend_db::db_test!(
    every_profile_write_is_logged_once,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        // Created, then changed, by a fetch (an upsert on both paths of `ON CONFLICT`).
        profiles::upsert_fetched(
            &db.conn,
            ws,
            &[fetched("ann", None, "c1", json!({"score": "5"}))],
            ts(0),
        )
        .await?;
        assert_eq!(logged(&db, ws, "ann").await?, 1);
        profiles::upsert_fetched(
            &db.conn,
            ws,
            &[fetched("ann", None, "c1", json!({"score": "7"}))],
            ts(1),
        )
        .await?;
        assert_eq!(logged(&db, ws, "ann").await?, 2);
        // A backfill chunk: one changed, one new person (`load_snapshot`'s upsert).
        let row = |id: &str, score: &str| sharpsend_db::profile_sync::SnapshotRow {
            customer_id: id.to_owned(),
            email: None,
            cio_id: None,
            attributes: vec![("score".to_owned(), score.to_owned())],
        };
        sharpsend_db::profile_sync::load_snapshot(
            &db.conn,
            ws,
            &[row("ann", "9"), row("bob", "1")],
            ts(2),
            ts(2),
        )
        .await?;
        assert_eq!(logged(&db, ws, "ann").await?, 3);
        assert_eq!(logged(&db, ws, "bob").await?, 1);
        // SharpSend writes (mirror + outbox) of an existing and of a new person.
        outbox::accept_attribute_updates(
            &db.conn,
            ws,
            &[
                NewAttributeUpdate {
                    customer_id: "ann".into(),
                    attributes: attrs(json!({"score": 11})),
                },
                NewAttributeUpdate {
                    customer_id: "cy".into(),
                    attributes: attrs(json!({"plan": "pro"})),
                },
            ],
            ts(3),
        )
        .await?;
        assert_eq!(logged(&db, ws, "ann").await?, 4);
        assert_eq!(logged(&db, ws, "cy").await?, 1);
        // SQLite: the change log's update trigger names every column of `profiles` but the
        // shadow's, so a column added later without it fails here (its writes would go
        // unlogged).
        if db.conn.get_database_backend() == sea_orm::DbBackend::Sqlite {
            use sea_orm::{ConnectionTrait, Statement};
            let sql = db
                .conn
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Sqlite,
                    "SELECT sql FROM sqlite_master WHERE type = 'trigger' \
                     AND name = 'profile_changes_profiles_update'",
                ))
                .await?
                .ok_or("the change log's update trigger")?
                .try_get::<String>("", "sql")?;
            let columns = db
                .conn
                .query_all_raw(Statement::from_string(
                    sea_orm::DbBackend::Sqlite,
                    "SELECT name FROM pragma_table_info('profiles')",
                ))
                .await?;
            assert!(columns.len() > 5, "{columns:?}");
            for row in columns {
                let name: String = row.try_get("", "name")?;
                let listed = sql.contains(&format!("\"{name}\""));
                assert_eq!(listed, name != "numbers", "column {name} in {sql}");
            }
        }
        TestResult::Ok(())
    }
);

/// The `profiles.numbers` shadow on PostgreSQL (`sharpsend_numbers`, migrations 000080 and
/// 000090): exactly the values the criteria's number conditions accept, whatever their first
/// character (000090 answers "not a number" from it before any regular expression).
#[tokio::test(flavor = "multi_thread")]
async fn the_numbers_shadow_takes_exactly_the_numbers_on_postgres() {
    use sea_orm::{ConnectionTrait, Statement};
    use sharpsend_db::testing::{Backend, run};

    run(Backend::Postgres, true, |db: TestDatabase| async move {
        // (attribute value, its number or None)
        let cases: &[(serde_json::Value, Option<&str>)] = &[
            (json!("80"), Some("80")),
            (json!(" 80 "), Some("80")),
            (json!("007"), Some("7")),
            (json!("0"), Some("0")),
            (json!("-0"), Some("0")),
            (json!("-1.5"), Some("-1.5")),
            (json!("1e2"), Some("100")),
            (json!(" 1e2 "), Some("100")),
            (json!("1E+04"), Some("10000")),
            (json!("99999999999999999999999"), Some("99999999999999999999999")),
            // Exponents beyond `numeric`: ±1e400 (beyond every double), or 0.
            (json!("1e99999"), Some("1e400")),
            (json!(" -1e99999"), Some("-1e400")),
            (json!("0e99999"), Some("0")),
            (json!("1e-99999"), Some("0")),
            (json!("-0.0e5"), Some("0")),
            (json!(87), Some("87")),
            (json!(-2.5), Some("-2.5")),
            (json!(1e3), Some("1000")),
            // Not numbers, whatever the first character.
            (json!("-007"), None),
            (json!("reader1@example.com"), None),
            (json!("-x"), None),
            (json!("- 1"), None),
            (json!(" x"), None),
            (json!(""), None),
            (json!("   "), None),
            (json!("\t42"), None),
            (json!("\u{663}"), None),
            (json!("é1"), None),
            (json!("+5"), None),
            (json!(".5"), None),
            (json!("5."), None),
            (json!("1e5x"), None),
            (json!("1 2"), None),
            (json!("12abc"), None),
            (json!("[\"stocks\"]"), None),
            (json!(true), None),
            (json!(null), None),
            (json!([1]), None),
            (json!({"x": 1}), None),
        ];
        let mut attributes = serde_json::Map::new();
        let mut expected = Vec::new();
        for (i, (value, number)) in cases.iter().enumerate() {
            let key = format!("k{i:02}");
            attributes.insert(key.clone(), value.clone());
            if let Some(n) = number {
                expected.push(format!("'{key}', {n}::numeric"));
            }
        }
        let sql = format!(
            "SELECT sharpsend_numbers($1::jsonb)::text AS got, \
             sharpsend_numbers($1::jsonb) = jsonb_build_object({}) AS same, \
             sharpsend_numbers('[1]') = '{{}}' AND sharpsend_numbers('\"5\"') = '{{}}' AS not_objects",
            expected.join(", ")
        );
        let row = db
            .conn
            .query_one_raw(Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                &sql,
                [serde_json::Value::Object(attributes.clone()).to_string().into()],
            ))
            .await?
            .ok_or("no row")?;
        let got: String = row.try_get("", "got")?;
        assert!(row.try_get::<bool>("", "same")?, "{attributes:?} gave {got}");
        assert!(row.try_get::<bool>("", "not_objects")?);
        TestResult::Ok(())
    })
    .await;
}

/// The rows of `table` in workspace `ws`.
async fn rows_of(db: &TestDatabase, table: &str, ws: i64) -> Result<i64, sharpsend_db::DbError> {
    count(
        db,
        &format!("SELECT COUNT(*) AS n FROM {table} WHERE workspace_id = $1"),
        vec![ws.into()],
    )
    .await
}

sharpsend_db::db_test!(
    profiles_outbox_rows_and_members_belong_to_an_existing_workspace,
    |db: TestDatabase| async move {
        use sea_orm::{ConnectionTrait, Statement};
        let backend = db.conn.get_database_backend();
        let ws = workspace(&db, "site-1").await?;
        let kept = workspace(&db, "site-2").await?;
        let missing = kept + 100;
        // No profile, outbox row or segment member for a workspace that does not exist, however
        // written (PostgreSQL checks once per statement since migrations 000092 and 000097,
        // SQLite by foreign key).
        let refused = profiles::upsert_fetched(
            &db.conn,
            missing,
            &[fetched("ann", None, "c1", json!({}))],
            ts(0),
        )
        .await;
        assert!(refused.is_err(), "{refused:?}");
        let update = |who: &str| NewAttributeUpdate {
            customer_id: who.into(),
            attributes: attrs(json!({"plan": "pro"})),
        };
        let refused =
            outbox::accept_attribute_updates(&db.conn, missing, &[update("ann")], ts(0)).await;
        assert!(refused.is_err(), "{refused:?}");
        let param = |n: usize| {
            if backend == sea_orm::DbBackend::Postgres {
                format!("${n}")
            } else {
                "?".to_owned()
            }
        };
        // Members, as an evaluation writes them: many rows in one statement.
        let add_members = |workspace: i64, people: std::ops::Range<i32>| {
            let values: Vec<String> = people
                .map(|i| format!("({workspace}, 7, 'p{i}')"))
                .collect();
            Statement::from_string(
                backend,
                format!(
                    "INSERT INTO segment_members (workspace_id, segment_id, customer_id) VALUES {}",
                    values.join(", ")
                ),
            )
        };
        let refused = db.conn.execute_raw(add_members(missing, 0..3)).await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(rows_of(&db, "profiles", missing).await?, 0);
        assert_eq!(rows_of(&db, "outbox", missing).await?, 0);
        assert_eq!(rows_of(&db, "segment_members", missing).await?, 0);
        // Many people of existing workspaces in one statement are accepted.
        let many: Vec<NewAttributeUpdate> = (0..300).map(|i| update(&format!("p{i}"))).collect();
        outbox::accept_attribute_updates(&db.conn, ws, &many, ts(0)).await?;
        outbox::accept_attribute_updates(&db.conn, kept, &[update("bob")], ts(0)).await?;
        db.conn.execute_raw(add_members(ws, 0..300)).await?;
        db.conn.execute_raw(add_members(kept, 0..1)).await?;
        // A row never moves to another workspace.
        for table in ["profiles", "outbox", "segment_members"] {
            let moved = db
                .conn
                .execute_raw(Statement::from_sql_and_values(
                    backend,
                    format!(
                        "UPDATE {table} SET workspace_id = {} WHERE workspace_id = {}",
                        param(1),
                        param(2)
                    ),
                    [missing.into(), ws.into()],
                ))
                .await;
            assert!(moved.is_err(), "{table}: {moved:?}");
        }
        // Deleting a workspace deletes its profiles, outbox rows and members, and only its own.
        assert_eq!(rows_of(&db, "profiles", ws).await?, 300);
        assert_eq!(rows_of(&db, "segment_members", ws).await?, 300);
        db.conn
            .execute_raw(Statement::from_sql_and_values(
                backend,
                format!("DELETE FROM workspaces WHERE id = {}", param(1)),
                [ws.into()],
            ))
            .await?;
        for table in ["profiles", "outbox", "segment_members"] {
            assert_eq!(rows_of(&db, table, ws).await?, 0, "{table}");
            assert_eq!(rows_of(&db, table, kept).await?, 1, "{table}");
        }
        TestResult::Ok(())
    }
);

/// The `profiles.numbers` shadow on PostgreSQL stays `sharpsend_numbers(attributes)` whoever
/// writes (migration 000096): the attribute merge, which computes it from the patch alone;
/// the profile sync, which passes the proposed row's on; people created by events; and any
/// other `INSERT` or `UPDATE`, which the triggers cover. Random patches (numbers, numeric and
/// other text, removals, booleans) over a few people and keys, checked after every call.
#[tokio::test(flavor = "multi_thread")]
async fn the_numbers_shadow_follows_every_write_on_postgres() {
    use sea_orm::{ConnectionTrait, Statement};
    use sharpsend_db::outbox::NewEvent;
    use sharpsend_db::testing::{Backend, run};

    run(Backend::Postgres, true, |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let stale = || async {
            let row = c
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) FILTER (WHERE numbers IS DISTINCT FROM \
                     sharpsend_numbers(attributes)) AS stale, count(*) AS n FROM profiles",
                ))
                .await?
                .ok_or_else(|| sea_orm::DbErr::RecordNotFound("counts".into()))?;
            Ok::<(i64, i64), sea_orm::DbErr>((row.try_get("", "stale")?, row.try_get("", "n")?))
        };
        let values = [
            json!(5),
            json!(-2.5),
            json!("80"),
            json!(" 1e2 "),
            json!("007"),
            json!("n/a"),
            json!("-x"),
            json!(""),
            json!(true),
            json!(null),
            json!(["1"]),
        ];
        let mut seed: u64 = 0x5eed;
        let mut next = |n: usize| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(seed >> 33).unwrap_or(0) % n
        };
        for round in 0..40 {
            let mut updates = Vec::new();
            for _ in 0..1 + next(12) {
                let mut patch = serde_json::Map::new();
                for _ in 0..1 + next(3) {
                    patch.insert(format!("k{}", next(5)), values[next(values.len())].clone());
                }
                updates.push(NewAttributeUpdate {
                    customer_id: format!("p{}", next(15)),
                    attributes: patch,
                });
            }
            outbox::accept_attribute_updates(c, ws, &updates, ts(round)).await?;
            let (bad, n) = stale().await?;
            assert_eq!(
                bad, 0,
                "round {round}: {bad} of {n} profiles after {updates:?}"
            );
        }

        // The profile sync replaces attributes whole.
        let batch = vec![
            fetched("p1", None, "cio_1", json!({"k0": "12", "k9": "text"})),
            fetched("new", None, "cio_n", json!({"k1": 3})),
        ];
        profiles::upsert_fetched(c, ws, &batch, ts(100)).await?;
        // Events create people with nothing known.
        outbox::accept_events(
            c,
            ws,
            &[NewEvent {
                customer_id: "from-event".into(),
                event_id: "01JE000000000000000000000A".into(),
                name: "opened".into(),
                data: json!({}),
                timestamp: None,
                idempotency_key: None,
            }],
            ts(101),
        )
        .await?;
        // Any other writer: the triggers.
        c.execute_unprepared(
            "UPDATE profiles SET attributes = attributes || '{\"k2\": \"41\"}' \
             WHERE customer_id IN ('p2', 'p3'); \
             INSERT INTO profiles (workspace_id, customer_id, attributes, updated_at) \
             SELECT workspace_id, 'by-hand', '{\"k3\": 7, \"k4\": \"x\"}', now() FROM profiles \
             WHERE customer_id = 'p1'",
        )
        .await?;
        let (bad, n) = stale().await?;
        assert_eq!(bad, 0, "{bad} of {n} profiles after the other writers");
        assert!(n >= 18, "{n} profiles");
        let by_hand = c
            .query_one_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT numbers::text AS n FROM profiles WHERE customer_id = 'by-hand'",
            ))
            .await?
            .ok_or("by-hand missing")?
            .try_get::<String>("", "n")?;
        assert_eq!(by_hand, r#"{"k3": 7}"#);
        TestResult::Ok(())
    })
    .await;
}
