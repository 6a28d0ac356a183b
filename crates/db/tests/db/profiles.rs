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
