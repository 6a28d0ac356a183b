//! SQL building blocks shared by the repositories.

use sea_orm::sea_query::Expr;
use sea_orm::{DbBackend, IdenStatic};
use serde_json::Value;

/// Largest row limit passed to the database (the drivers bind limits as signed integers; a larger
/// `u64` panics inside sea-query on SQLite).
pub(crate) const MAX_ROW_LIMIT: u64 = i64::MAX as u64;

/// `column IN (…)` over `ids`, bound as ONE JSON array parameter.
///
/// Why not `column IN ($1, …, $n)`: PostgreSQL switches a prepared statement to a generic plan
/// after a few executions, and for a long parameter list that plan can end up scanning every
/// row of the workspace and comparing each with all `n` values (hundreds of milliseconds at a
/// few thousand rows, worse as tables grow, until statistics happen to steer it right). A
/// single array parameter gives the same statement text for any `n`, has no bind-parameter
/// limit, and plans as a semi-join probing the index. SQLite reads the array with `json_each`.
pub(crate) fn id_in(backend: DbBackend, column: impl IdenStatic, ids: &[i64]) -> Expr {
    in_json_array(
        backend,
        column.as_str(),
        "::bigint",
        Value::from(ids.to_vec()),
    )
}

/// `column IN (…)` over `values`, as [`id_in`].
pub(crate) fn text_in(backend: DbBackend, column: impl IdenStatic, values: &[&str]) -> Expr {
    in_json_array(backend, column.as_str(), "", Value::from(values.to_vec()))
}

fn in_json_array(backend: DbBackend, column: &str, pg_cast: &str, array: Value) -> Expr {
    match backend {
        DbBackend::Postgres => Expr::cust_with_values(
            format!("\"{column}\" IN (SELECT jsonb_array_elements_text($1){pg_cast})"),
            [array],
        ),
        _ => Expr::cust_with_values(
            format!("\"{column}\" IN (SELECT value FROM json_each(?))"),
            [array],
        ),
    }
}
