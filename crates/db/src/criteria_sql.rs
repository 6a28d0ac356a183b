//! Segment criteria compiled to SQL over the profiles mirror, evaluated inside the database.
//!
//! [`Filter`] is the database's form of validated criteria (`sharpsend_core::criteria` builds
//! it, relative times already resolved to Unix seconds). [`SqlBuilder::filter`] turns it into a
//! boolean SQL expression over a `profiles` row, every value a bound parameter — never text
//! spliced into SQL — using PostgreSQL's JSONB operators or SQLite's JSON functions.
//!
//! Typed semantics, identical on both backends (attribute values imported from Customer.io are
//! all strings; values written by SharpSend keep their JSON types):
//! - text conditions (`eq`, `gt`/`gte`/`lt`/`lte` byte-wise, `in`, `contains`, `starts_with`)
//!   match JSON strings only; `contains` also matches an array holding that string;
//! - number (and timestamp, as Unix seconds) conditions match JSON numbers and numeric strings:
//!   digits only (`"87"`, `"007"`) or JSON number syntax with spaces around (`" -1.5e3 "`); any
//!   other value never matches. The check and conversion happen once, on write: number
//!   conditions read the typed shadow `profiles.numbers` (each attribute's value as a number
//!   when it is one; kept on write by triggers, and on PostgreSQL by the attribute merge from
//!   the patch — see migrations `m20261207_000080_profile_numbers` and
//!   `m20261207_000096_numbers_from_the_patch`), not the text of every row at every
//!   evaluation. [`SqlBuilder::reading_attributes`] keeps the per-row check (PostgreSQL casts
//!   text to `numeric` only once it has been checked — digits only, or a regular expression —
//!   so a bad value cannot raise) as the reference tests compare the shadow with.
//!   Precision: a condition's value is a double, and attribute values of at most 15
//!   significant digits compare the same on both backends. Beyond that they may not:
//!   PostgreSQL compares exact decimals (`"0.10000000000000001"` is greater than 0.1), SQLite
//!   reads text with a fraction or an exponent, and integers beyond 64 bits, as a double
//!   (`"0.10000000000000001"` equals 0.1) and compares 64-bit integers exactly;
//! - boolean conditions match `true`/`false` and the strings `"true"`/`"false"`;
//! - `exists`: the attribute is present and not null;
//! - segment membership: an `EXISTS` probe of `segment_members` (primary key).
//!
//! Every condition is true or false, never unknown: [`Filter::Not`] matches exactly the
//! profiles its operand does not (a missing attribute makes a condition false, so its negation
//! true).
//!
//! Attribute names must not contain `"` or `\` (SQLite JSON paths cannot address them); the
//! criteria validation in `sharpsend-core` refuses such names.

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement, Value};
use serde_json::json;

use crate::DbError;

/// How a value is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Comparison {
    Eq,
    Gt,
    Gte,
    Lt,
    Lte,
}

impl Comparison {
    fn sql(self) -> &'static str {
        match self {
            Comparison::Eq => "=",
            Comparison::Gt => ">",
            Comparison::Gte => ">=",
            Comparison::Lt => "<",
            Comparison::Lte => "<=",
        }
    }
}

/// What a text condition checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextOp {
    /// Equality or byte-wise ordering.
    Compare(Comparison),
    /// A string containing the value, or an array with an element equal to it.
    Contains,
    /// A string starting with the value.
    StartsWith,
}

/// Criteria over one profile, as the database evaluates them.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Every operand holds (true when empty).
    All(Vec<Filter>),
    /// At least one operand holds (false when empty).
    Any(Vec<Filter>),
    /// The operand does not hold.
    Not(Box<Filter>),
    /// A string attribute compared with a string.
    Text {
        attribute: String,
        op: TextOp,
        value: String,
    },
    /// A string attribute equal to one of the values.
    TextIn {
        attribute: String,
        values: Vec<String>,
    },
    /// A numeric attribute (JSON number or numeric string) compared with a number.
    Number {
        attribute: String,
        op: Comparison,
        value: f64,
    },
    /// A numeric attribute equal to one of the values.
    NumberIn { attribute: String, values: Vec<f64> },
    /// A boolean attribute (or `"true"` / `"false"`) equal to the value.
    Bool { attribute: String, value: bool },
    /// The attribute is present and not null.
    Exists { attribute: String },
    /// The person is a member of this Customer.io segment (per `segment_members`).
    InSegment { segment_id: i64 },
}

/// Values of a number attribute between `from` and `to` (both included): where a condition
/// relative to the evaluation time can change its answer as the clock moves (see
/// `sharpsend_core::criteria::Criteria::time_windows`).
#[derive(Debug, Clone, PartialEq)]
pub struct TimeWindow {
    pub attribute: String,
    pub from: f64,
    pub to: f64,
}

/// The number of `attribute` in the typed shadow `numbers` (of the row aliased `alias`, or
/// unqualified), written with the attribute name inline so that an expression index on it can
/// serve a query ([`ensure_time_index`]; a bound parameter never matches an index expression).
/// `None` for names other than ASCII letters, digits and `_`: those are only ever bound.
fn indexable_number(backend: DbBackend, alias: Option<&str>, attribute: &str) -> Option<String> {
    let simple = !attribute.is_empty()
        && attribute
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_');
    if !simple {
        return None;
    }
    let numbers = alias.map_or_else(|| "numbers".to_owned(), |a| format!("{a}.numbers"));
    Some(match backend {
        DbBackend::Postgres => format!("CAST({numbers} -> '{attribute}' AS numeric)"),
        _ => format!("json_extract({numbers}, '{}')", sqlite_path(attribute)),
    })
}

/// The expression index that serves [`SqlBuilder::time_window`] for `attribute`: its name (a
/// hash of the attribute, so any name fits) and definition. `None` when no index can serve it.
fn time_index(backend: DbBackend, attribute: &str) -> Option<(String, String)> {
    let expression = indexable_number(backend, None, attribute)?;
    // FNV-1a: stable across builds and platforms, unlike `DefaultHasher`.
    let hash = attribute.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let name = format!("ix_profiles_time_{hash:016x}");
    Some((name, format!("profiles (workspace_id, {expression})")))
}

/// Makes sure the profiles have an index on `attribute`'s number (see
/// [`SqlBuilder::time_window`]), so that the people whose value lies in a time window are found
/// without reading every profile: called for the attributes of relative-time conditions before
/// evaluating segments. A lookup when it exists. PostgreSQL builds it `CONCURRENTLY` (writes go
/// on meanwhile; it must not run inside a transaction) and rebuilds one left invalid by a failed
/// build. Returns whether it created one.
pub async fn ensure_time_index(db: &impl ConnectionTrait, attribute: &str) -> Result<bool, DbErr> {
    let backend = db.get_database_backend();
    let Some((name, definition)) = time_index(backend, attribute) else {
        return Ok(false);
    };
    if backend == DbBackend::Postgres {
        let state = db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                "SELECT i.indisvalid AS valid, EXISTS (SELECT 1 FROM pg_stat_progress_create_index p \
                 WHERE p.index_relid = i.indexrelid) AS building \
                 FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
                [name.clone().into()],
            ))
            .await?;
        if let Some(row) = state {
            let (valid, building): (bool, bool) =
                (row.try_get("", "valid")?, row.try_get("", "building")?);
            if valid || building {
                return Ok(false);
            }
            db.execute_unprepared(&format!("DROP INDEX CONCURRENTLY IF EXISTS {name}"))
                .await?;
        }
        db.execute_unprepared(&format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {definition}"
        ))
        .await?;
    } else {
        let exists = db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                "SELECT 1 AS found FROM sqlite_master WHERE type = 'index' AND name = ?",
                [name.clone().into()],
            ))
            .await?
            .is_some();
        if exists {
            return Ok(false);
        }
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {definition}"
        ))
        .await?;
    }
    tracing::info!(attribute, index = %name, "index for relative-time conditions created");
    Ok(true)
}

impl TimeWindow {
    /// The window as a filter: the attribute's number within `from..=to`.
    pub fn filter(&self) -> Filter {
        Filter::All(vec![
            Filter::Number {
                attribute: self.attribute.clone(),
                op: Comparison::Gte,
                value: self.from,
            },
            Filter::Number {
                attribute: self.attribute.clone(),
                op: Comparison::Lte,
                value: self.to,
            },
        ])
    }
}

impl Filter {
    /// The segments whose membership the filter reads.
    pub fn segments(&self) -> Vec<i64> {
        let mut out = Vec::new();
        self.collect_segments(&mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    fn collect_segments(&self, out: &mut Vec<i64>) {
        match self {
            Filter::All(items) | Filter::Any(items) => {
                items.iter().for_each(|f| f.collect_segments(out));
            }
            Filter::Not(inner) => inner.collect_segments(out),
            Filter::InSegment { segment_id } => out.push(*segment_id),
            _ => {}
        }
    }
}

/// Digits, removed by `ltrim` to recognise the most common numeric text — a non-negative whole
/// number, what Customer.io holds for scores, counts and Unix times — without a regular
/// expression (about half the cost per row).
const DIGITS: &str = "0123456789";
/// A string in JSON number syntax, optionally surrounded by spaces, with an exponent of at most
/// four digits: what PostgreSQL casts to `numeric` (which holds it without overflow).
const PG_NUMERIC_TEXT: &str = r"^ *-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]{1,4})? *$";
/// JSON number syntax with a longer exponent: beyond `numeric`'s range, read as SQLite reads
/// it (a double): ±infinity, or 0 for a zero mantissa or a negative exponent.
const PG_HUGE_NUMBER_TEXT: &str = r"^ *-?(0|[1-9][0-9]*)(\.[0-9]+)?[eE][-+]?[0-9]+ *$";
/// SQLite: characters a string in JSON number syntax (with spaces around) can hold; checked
/// before the exact `json_valid`, to skip most non-numbers cheaply.
const SQLITE_NUMBER_CHARS: &str = "*[^0-9eE.+ -]*";
/// SQLite: a string holding a character other than a digit.
const SQLITE_NOT_DIGIT: &str = "*[^0-9]*";

/// Builds one SQL statement with its bound values, placeholders numbered for the backend
/// (`$1`, `$2`… on PostgreSQL, `?` on SQLite, in text order).
#[derive(Debug, Clone)]
pub struct SqlBuilder {
    backend: DbBackend,
    sql: String,
    values: Vec<Value>,
    /// PostgreSQL: segment-membership conditions as per-row index probes ([`SqlBuilder::probing`]).
    probing: bool,
    /// Number conditions check and convert the attribute's text on every row
    /// ([`SqlBuilder::reading_attributes`]) instead of reading the typed shadow `numbers`.
    from_attributes: bool,
}

impl SqlBuilder {
    pub fn new(backend: DbBackend) -> Self {
        Self {
            backend,
            sql: String::with_capacity(512),
            values: Vec::new(),
            probing: false,
            from_attributes: false,
        }
    }

    /// Number conditions read `attributes` (checking the text before converting it, on every
    /// row) instead of the typed shadow `profiles.numbers` maintained on write: the reference
    /// the shadow is tested against, and what a relation without `numbers` needs.
    pub fn reading_attributes(&mut self, on: bool) -> &mut Self {
        self.from_attributes = on;
        self
    }

    /// PostgreSQL: from now on, write segment-membership conditions (and [`SqlBuilder::probe_fence`])
    /// so that each is evaluated as an index probe per row (`OFFSET 0` keeps the planner from
    /// turning the `EXISTS` into a join). For statements over a short list of people: a join
    /// would be planned from `segment_members`' statistics, and those of a segment just filled
    /// (a managed segment's first evaluation) still say it is empty — PostgreSQL then walks the
    /// whole segment instead of probing it once per person. No effect on SQLite.
    pub fn probing(&mut self, on: bool) -> &mut Self {
        self.probing = on;
        self
    }

    /// ` OFFSET 0` when [`SqlBuilder::probing`] on PostgreSQL: ends a subquery that must stay a
    /// per-row probe.
    pub fn probe_fence(&mut self) -> &mut Self {
        if self.probing && self.backend == DbBackend::Postgres {
            self.sql(" OFFSET 0");
        }
        self
    }

    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Appends SQL text (never caller data: that goes through [`SqlBuilder::param`]).
    pub fn sql(&mut self, text: &str) -> &mut Self {
        self.sql.push_str(text);
        self
    }

    /// Appends a placeholder bound to `value`.
    pub fn param(&mut self, value: impl Into<Value>) -> &mut Self {
        self.values.push(value.into());
        match self.backend {
            DbBackend::Postgres => {
                let n = self.values.len();
                self.sql.push('$');
                self.sql.push_str(&n.to_string());
            }
            _ => self.sql.push('?'),
        }
        self
    }

    /// The statement built so far.
    pub fn build(self) -> Statement {
        Statement::from_sql_and_values(self.backend, self.sql, self.values)
    }

    /// The SQL text built so far (for tests and diagnostics).
    pub fn text(&self) -> &str {
        &self.sql
    }

    /// Appends `(<alias>'s number of the window's attribute BETWEEN from AND to)`, what
    /// [`TimeWindow::filter`] selects, written so that the index [`ensure_time_index`] creates
    /// can serve it (the filter itself when no index can).
    pub fn time_window(&mut self, window: &TimeWindow, alias: &str) -> &mut Self {
        let Some(number) = indexable_number(self.backend, Some(alias), &window.attribute) else {
            return self.filter(&window.filter(), alias);
        };
        self.sql("(").sql(&number).sql(" BETWEEN ");
        if self.backend == DbBackend::Postgres {
            self.sql("CAST(")
                .param(number_text(window.from))
                .sql(" AS numeric) AND CAST(")
                .param(number_text(window.to))
                .sql(" AS numeric))")
        } else {
            self.param(window.from)
                .sql(" AND ")
                .param(window.to)
                .sql(")")
        }
    }

    /// Appends `filter` as a boolean expression over the `profiles` row aliased `alias`.
    pub fn filter(&mut self, filter: &Filter, alias: &str) -> &mut Self {
        match self.backend {
            DbBackend::Postgres => self.pg_filter(filter, alias),
            _ => self.sqlite_filter(filter, alias),
        }
        self
    }

    fn group(&mut self, operands: &[Filter], joiner: &str, empty: &str, alias: &str) {
        if operands.is_empty() {
            self.sql(empty);
            return;
        }
        self.sql("(");
        for (i, f) in operands.iter().enumerate() {
            if i > 0 {
                self.sql(joiner);
            }
            self.filter(f, alias);
        }
        self.sql(")");
    }

    fn in_segment(&mut self, segment_id: i64, alias: &str) {
        self.sql("EXISTS (SELECT 1 FROM segment_members sm WHERE sm.workspace_id = ")
            .sql(alias)
            .sql(".workspace_id AND sm.segment_id = ")
            .param(segment_id)
            .sql(" AND sm.customer_id = ")
            .sql(alias)
            .sql(".customer_id");
        self.probe_fence();
        self.sql(")");
    }

    // ----- PostgreSQL -----

    /// `alias.attributes -> $k`
    fn pg_value(&mut self, alias: &str, attribute: &str) {
        self.sql("(")
            .sql(alias)
            .sql(".attributes -> ")
            .param(attribute)
            .sql(")");
    }

    /// `alias.attributes ->> $k`
    fn pg_text(&mut self, alias: &str, attribute: &str) {
        self.sql("(")
            .sql(alias)
            .sql(".attributes ->> ")
            .param(attribute)
            .sql(")");
    }

    fn pg_is_string(&mut self, alias: &str, attribute: &str) {
        self.sql("jsonb_typeof");
        self.pg_value(alias, attribute);
        self.sql(" = 'string'");
    }

    /// The attribute as `numeric`: a JSON number, or a numeric string; else NULL.
    ///
    /// Read as text (`->>`: a JSON number gives its digits, a bool `true`/`false`, a list or
    /// object its JSON text), and cast only once the text is known to be a number, so no value
    /// can make the cast fail: digits only (`ltrim` leaves nothing; `NULLIF` turns the empty
    /// string away), else JSON number syntax checked by a regular expression. No type test is
    /// needed: only numbers and numeric strings give numeric text.
    fn pg_number(&mut self, alias: &str, attribute: &str) {
        self.sql("(CASE WHEN ltrim(");
        self.pg_text(alias, attribute);
        self.sql(", ").param(DIGITS).sql(") = '' THEN NULLIF(");
        self.pg_text(alias, attribute);
        self.sql(", '')::numeric WHEN ");
        self.pg_text(alias, attribute);
        self.sql(" ~ ").param(PG_NUMERIC_TEXT).sql(" THEN ");
        self.pg_text(alias, attribute);
        self.sql("::numeric WHEN ");
        self.pg_text(alias, attribute);
        self.sql(" ~ ")
            .param(PG_HUGE_NUMBER_TEXT)
            .sql(" THEN (CASE WHEN ");
        self.pg_text(alias, attribute);
        self.sql(" ~ '([eE]-|^ *-?0(\\.0+)?[eE])' THEN '0' WHEN ");
        self.pg_text(alias, attribute);
        self.sql(" ~ '^ *-' THEN '-Infinity' ELSE 'Infinity' END)::numeric END)");
    }

    fn pg_filter(&mut self, filter: &Filter, alias: &str) {
        match filter {
            Filter::All(all) => self.group(all, " AND ", "TRUE", alias),
            Filter::Any(any) => self.group(any, " OR ", "FALSE", alias),
            Filter::Not(inner) => {
                self.sql("(NOT COALESCE(");
                self.filter(inner, alias);
                self.sql(", FALSE))");
            }
            Filter::Text {
                attribute,
                op,
                value,
            } => match op {
                // Text equality alone is exact unless the value could also be the text of a
                // number, a bool, a list or an object; only then is the type checked too.
                TextOp::Compare(Comparison::Eq) => {
                    self.sql("(");
                    self.pg_text(alias, attribute);
                    self.sql(" = ").param(value.as_str());
                    if may_be_text_of_non_string(value) {
                        self.sql(" AND ");
                        self.pg_is_string(alias, attribute);
                    }
                    self.sql(")");
                }
                TextOp::Compare(cmp) => {
                    self.sql("(");
                    self.pg_is_string(alias, attribute);
                    self.sql(" AND ");
                    self.pg_text(alias, attribute);
                    self.sql(" COLLATE \"C\" ")
                        .sql(cmp.sql())
                        .sql(" ")
                        .param(value.as_str())
                        .sql(" COLLATE \"C\")");
                }
                TextOp::Contains => {
                    self.sql("(CASE jsonb_typeof");
                    self.pg_value(alias, attribute);
                    self.sql(" WHEN 'string' THEN strpos(");
                    self.pg_text(alias, attribute);
                    self.sql(", ")
                        .param(value.as_str())
                        .sql(") > 0 WHEN 'array' THEN ");
                    self.pg_value(alias, attribute);
                    self.sql(" @> ")
                        .param(json!([value]))
                        .sql("::jsonb ELSE FALSE END)");
                }
                TextOp::StartsWith => {
                    self.sql("(");
                    self.pg_is_string(alias, attribute);
                    self.sql(" AND starts_with(");
                    self.pg_text(alias, attribute);
                    self.sql(", ").param(value.as_str()).sql("))");
                }
            },
            Filter::TextIn { attribute, values } => {
                self.sql("(");
                self.pg_text(alias, attribute);
                self.sql(" IN (SELECT jsonb_array_elements_text(")
                    .param(json!(values))
                    .sql("::jsonb))");
                if values.iter().any(|v| may_be_text_of_non_string(v)) {
                    self.sql(" AND ");
                    self.pg_is_string(alias, attribute);
                }
                self.sql(")");
            }
            Filter::Number {
                attribute,
                op,
                value,
            } if !self.from_attributes => {
                // The shadow holds JSON numbers only, so the cast to `numeric` cannot fail (a
                // missing attribute gives NULL). Compared as `numeric`s: comparing the two
                // `jsonb` values instead gives the same answer but goes through jsonb's
                // generic container comparison on every row, which made a full evaluation
                // ~1.3x slower than the hand-written `(attributes->>…)::numeric` (issue #18).
                self.sql("(CAST(")
                    .sql(alias)
                    .sql(".numbers -> ")
                    .param(attribute.as_str())
                    .sql(" AS numeric) ")
                    .sql(op.sql())
                    .sql(" CAST(")
                    .param(number_text(*value))
                    .sql(" AS numeric))");
            }
            Filter::NumberIn { attribute, values } if !self.from_attributes => {
                self.sql("(CAST(")
                    .sql(alias)
                    .sql(".numbers -> ")
                    .param(attribute.as_str())
                    .sql(" AS numeric) IN (SELECT CAST(jsonb_array_elements_text(")
                    .param(json!(
                        values.iter().map(|v| number_text(*v)).collect::<Vec<_>>()
                    ))
                    .sql("::jsonb) AS numeric)))");
            }
            Filter::Number {
                attribute,
                op,
                value,
            } => {
                self.sql("(");
                self.pg_number(alias, attribute);
                self.sql(" ")
                    .sql(op.sql())
                    .sql(" CAST(")
                    .param(number_text(*value))
                    .sql(" AS numeric))");
            }
            Filter::NumberIn { attribute, values } => {
                self.sql("(");
                self.pg_number(alias, attribute);
                self.sql(" IN (SELECT CAST(jsonb_array_elements_text(")
                    .param(json!(
                        values.iter().map(|v| number_text(*v)).collect::<Vec<_>>()
                    ))
                    .sql("::jsonb) AS numeric)))");
            }
            Filter::Bool { attribute, value } => {
                self.sql("(");
                self.pg_value(alias, attribute);
                self.sql(if *value {
                    " IN ('true'::jsonb, '\"true\"'::jsonb))"
                } else {
                    " IN ('false'::jsonb, '\"false\"'::jsonb))"
                });
            }
            Filter::Exists { attribute } => {
                self.sql("(COALESCE(jsonb_typeof");
                self.pg_value(alias, attribute);
                self.sql(", 'null') <> 'null')");
            }
            Filter::InSegment { segment_id } => self.in_segment(*segment_id, alias),
        }
    }

    // ----- SQLite -----

    fn sqlite_type(&mut self, alias: &str, attribute: &str) {
        self.sql("json_type(")
            .sql(alias)
            .sql(".attributes, ")
            .param(sqlite_path(attribute))
            .sql(")");
    }

    fn sqlite_extract(&mut self, alias: &str, attribute: &str) {
        self.sql("json_extract(")
            .sql(alias)
            .sql(".attributes, ")
            .param(sqlite_path(attribute))
            .sql(")");
    }

    /// The attribute as a number: a JSON number, or a numeric string (digits only, or JSON
    /// number syntax with spaces around allowed); else NULL. A string is converted only once
    /// it is known to be one of those (`json_valid` accepts exactly JSON's number syntax there;
    /// SQLite's own conversion would read `"12abc"` as 12).
    ///
    /// The type and value are read once, in a scalar subquery, and then reused; SQLite also
    /// evaluates such terms after the cheaper ones of the same `WHERE`.
    fn sqlite_number(&mut self, alias: &str, attribute: &str) {
        self.sql(
            "(SELECT CASE jt WHEN 'integer' THEN jv WHEN 'real' THEN jv \
             WHEN 'text' THEN (CASE WHEN jv <> '' AND jv NOT GLOB ",
        )
        .param(SQLITE_NOT_DIGIT)
        .sql(" THEN CAST(jv AS NUMERIC) WHEN jv NOT GLOB ")
        .param(SQLITE_NUMBER_CHARS)
        .sql(" AND json_valid(jv) THEN CAST(jv AS NUMERIC) END) END FROM (SELECT ");
        self.sqlite_type(alias, attribute);
        self.sql(" AS jt, ");
        self.sqlite_extract(alias, attribute);
        self.sql(" AS jv))");
    }

    fn sqlite_filter(&mut self, filter: &Filter, alias: &str) {
        match filter {
            Filter::All(all) => self.group(all, " AND ", "TRUE", alias),
            Filter::Any(any) => self.group(any, " OR ", "FALSE", alias),
            Filter::Not(inner) => {
                self.sql("(NOT COALESCE(");
                self.filter(inner, alias);
                self.sql(", FALSE))");
            }
            Filter::Text {
                attribute,
                op,
                value,
            } => match op {
                // The comparison first: it fails for most rows, sparing the type check. An
                // equality with a text param can only meet a string, or a list / object (whose
                // JSON text `json_extract` returns): the type is checked only in that case.
                TextOp::Compare(cmp) => {
                    self.sql("(");
                    self.sqlite_extract(alias, attribute);
                    self.sql(" ").sql(cmp.sql()).sql(" ").param(value.as_str());
                    if *cmp != Comparison::Eq || may_be_text_of_non_string(value) {
                        self.sql(" AND ");
                        self.sqlite_type(alias, attribute);
                        self.sql(" = 'text'");
                    }
                    self.sql(")");
                }
                TextOp::Contains => {
                    self.sql("(CASE ");
                    self.sqlite_type(alias, attribute);
                    self.sql(" WHEN 'text' THEN instr(");
                    self.sqlite_extract(alias, attribute);
                    self.sql(", ")
                        .param(value.as_str())
                        .sql(") > 0 WHEN 'array' THEN EXISTS (SELECT 1 FROM json_each(")
                        .sql(alias)
                        .sql(".attributes, ")
                        .param(sqlite_path(attribute))
                        .sql(") e WHERE e.type = 'text' AND e.value = ")
                        .param(value.as_str())
                        .sql(") ELSE FALSE END)");
                }
                TextOp::StartsWith => {
                    self.sql("(substr(");
                    self.sqlite_extract(alias, attribute);
                    self.sql(", 1, length(")
                        .param(value.as_str())
                        .sql(")) = ")
                        .param(value.as_str())
                        .sql(" AND ");
                    self.sqlite_type(alias, attribute);
                    self.sql(" = 'text')");
                }
            },
            Filter::TextIn { attribute, values } => {
                self.sql("(");
                self.sqlite_extract(alias, attribute);
                self.sql(" IN (SELECT value FROM json_each(")
                    .param(json!(values).to_string())
                    .sql("))");
                if values.iter().any(|v| may_be_text_of_non_string(v)) {
                    self.sql(" AND ");
                    self.sqlite_type(alias, attribute);
                    self.sql(" = 'text'");
                }
                self.sql(")");
            }
            Filter::Number {
                attribute,
                op,
                value,
            } if !self.from_attributes => {
                self.sql("(json_extract(")
                    .sql(alias)
                    .sql(".numbers, ")
                    .param(sqlite_path(attribute))
                    .sql(") ")
                    .sql(op.sql())
                    .sql(" ")
                    .param(*value)
                    .sql(")");
            }
            Filter::NumberIn { attribute, values } if !self.from_attributes => {
                self.sql("(json_extract(")
                    .sql(alias)
                    .sql(".numbers, ")
                    .param(sqlite_path(attribute))
                    .sql(") IN (SELECT value FROM json_each(")
                    .param(json!(values).to_string())
                    .sql(")))");
            }
            Filter::Number {
                attribute,
                op,
                value,
            } => {
                self.sql("(");
                self.sqlite_number(alias, attribute);
                self.sql(" ").sql(op.sql()).sql(" ").param(*value).sql(")");
            }
            Filter::NumberIn { attribute, values } => {
                self.sql("(");
                self.sqlite_number(alias, attribute);
                self.sql(" IN (SELECT value FROM json_each(")
                    .param(json!(values).to_string())
                    .sql(")))");
            }
            Filter::Bool { attribute, value } => {
                self.sql("((CASE ");
                self.sqlite_type(alias, attribute);
                self.sql(" WHEN 'true' THEN 1 WHEN 'false' THEN 0 WHEN 'text' THEN (CASE ");
                self.sqlite_extract(alias, attribute);
                self.sql(" WHEN 'true' THEN 1 WHEN 'false' THEN 0 END) END) = ")
                    .sql(if *value { "1)" } else { "0)" });
            }
            Filter::Exists { attribute } => {
                self.sql("(COALESCE(");
                self.sqlite_type(alias, attribute);
                self.sql(", 'null') <> 'null')");
            }
            Filter::InSegment { segment_id } => self.in_segment(*segment_id, alias),
        }
    }
}

/// Whether `text` could equal the text form of a JSON value that is not a string: a number
/// (`-12.5`, as PostgreSQL prints one), a bool, or a list / object (JSON text). Equality with
/// any other text can only be met by a string, so no type test is needed.
fn may_be_text_of_non_string(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let numeric = !digits.is_empty()
        && digits.split_once('.').map_or(
            digits.bytes().all(|b| b.is_ascii_digit()),
            |(int, frac)| {
                !int.is_empty()
                    && !frac.is_empty()
                    && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
            },
        );
    numeric || text == "true" || text == "false" || text.starts_with('[') || text.starts_with('{')
}

/// SQLite JSON path of a top-level key: `$."name"`.
fn sqlite_path(attribute: &str) -> String {
    format!("$.\"{attribute}\"")
}

/// A number as PostgreSQL `numeric` input (shortest round-trip form, never an exponent).
fn number_text(value: f64) -> String {
    if value.is_finite() {
        format!("{value}")
    } else {
        // Validation refuses non-finite numbers; compare with something that matches nothing
        // sensible rather than failing the cast.
        "0".to_owned()
    }
}

/// `SELECT … FROM profiles p WHERE p.workspace_id = ? AND (filter)`, for callers adding their
/// own columns (`select`) and tail (ordering, limits).
pub fn matching_profiles(
    backend: DbBackend,
    workspace_id: i64,
    filter: &Filter,
    select: &str,
) -> SqlBuilder {
    let mut b = SqlBuilder::new(backend);
    b.sql("SELECT ")
        .sql(select)
        .sql(" FROM profiles p WHERE p.workspace_id = ")
        .param(workspace_id)
        .sql(" AND ");
    b.filter(filter, "p");
    b
}

/// The ids of the workspace's matching profiles (sorted), with number conditions read from
/// `attributes` (the text checked and converted on every row) instead of the typed shadow
/// `numbers`: the reference a test compares the evaluator, and so the shadow, with.
pub async fn reference_matching_ids(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    filter: &Filter,
) -> Result<Vec<String>, DbError> {
    let mut b = SqlBuilder::new(db.get_database_backend());
    b.reading_attributes(true);
    b.sql("SELECT p.customer_id FROM profiles p WHERE p.workspace_id = ")
        .param(workspace_id)
        .sql(" AND ");
    b.filter(filter, "p");
    b.sql(" ORDER BY p.customer_id");
    let rows = db.query_all_raw(b.build()).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(row.try_get::<String>("", "customer_id")?);
    }
    Ok(out)
}

/// How many profiles of the workspace match.
pub async fn count_matching(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    filter: &Filter,
) -> Result<u64, DbError> {
    let b = matching_profiles(
        db.get_database_backend(),
        workspace_id,
        filter,
        "COUNT(*) AS n",
    );
    let row = db.query_one_raw(b.build()).await?;
    let n: i64 = match row {
        Some(row) => row.try_get("", "n")?,
        None => 0,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

/// One matching profile, as listed by [`matching_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchingProfile {
    pub customer_id: String,
    pub email: Option<String>,
}

/// Matching profiles in `customer_id` order, after `after` (keyset paging), at most `limit`.
pub async fn matching_page(
    db: &impl ConnectionTrait,
    workspace_id: i64,
    filter: &Filter,
    after: Option<&str>,
    limit: u64,
) -> Result<Vec<MatchingProfile>, DbError> {
    let mut b = matching_profiles(
        db.get_database_backend(),
        workspace_id,
        filter,
        "p.customer_id, p.email",
    );
    if let Some(after) = after {
        b.sql(" AND p.customer_id > ").param(after);
    }
    b.sql(" ORDER BY p.customer_id LIMIT ")
        .param(i64::try_from(limit).unwrap_or(i64::MAX));
    let rows = db.query_all_raw(b.build()).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(MatchingProfile {
            customer_id: row.try_get("", "customer_id")?,
            email: row.try_get("", "email")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(backend: DbBackend, filter: &Filter) -> (String, usize) {
        let mut b = SqlBuilder::new(backend);
        b.filter(filter, "p");
        let n = b.values.len();
        (b.sql, n)
    }

    #[test]
    fn values_are_bound_never_spliced() {
        let evil = "x'); DROP TABLE profiles; --";
        let filter = Filter::All(vec![
            Filter::Text {
                attribute: evil.into(),
                op: TextOp::Compare(Comparison::Eq),
                value: evil.into(),
            },
            Filter::Text {
                attribute: "a".into(),
                op: TextOp::Contains,
                value: evil.into(),
            },
            Filter::TextIn {
                attribute: "a".into(),
                values: vec![evil.into()],
            },
        ]);
        for backend in [DbBackend::Postgres, DbBackend::Sqlite] {
            let (text, params) = sql(backend, &filter);
            assert!(!text.contains("DROP"), "{text}");
            assert!(params >= 5, "{params}");
        }
    }

    #[test]
    fn postgres_placeholders_are_numbered_in_order() {
        let filter = Filter::All(vec![
            Filter::Number {
                attribute: "score".into(),
                op: Comparison::Gt,
                value: 80.0,
            },
            Filter::InSegment { segment_id: 7 },
        ]);
        let mut b = SqlBuilder::new(DbBackend::Postgres);
        b.sql("SELECT 1 WHERE ").param(1_i64).sql(" = 1 AND ");
        b.filter(&filter, "p");
        let n = b.values.len();
        assert!(b.sql.contains(&format!("${n}")) && !b.sql.contains(&format!("${}", n + 1)));
        // Numbers reach PostgreSQL as numeric text, never as an exponent.
        assert_eq!(number_text(80.0), "80");
        assert_eq!(number_text(0.1), "0.1");
        assert_eq!(number_text(1e21), "1000000000000000000000");
    }

    #[test]
    fn the_type_test_is_kept_only_where_text_could_come_from_a_non_string() {
        for text in ["87", "-1.5", "0", "true", "false", "[\"a\"]", "{}"] {
            assert!(may_be_text_of_non_string(text), "{text}");
        }
        for text in ["growth", "", "-", "1.", ".5", "1e5", " 87", "True", "null"] {
            assert!(!may_be_text_of_non_string(text), "{text}");
        }
    }

    #[test]
    fn sqlite_uses_one_question_mark_per_value() {
        let filter = Filter::Not(Box::new(Filter::Bool {
            attribute: "vip".into(),
            value: true,
        }));
        let (text, params) = sql(DbBackend::Sqlite, &filter);
        assert_eq!(text.matches('?').count(), params);
        assert!(text.starts_with("(NOT COALESCE("), "{text}");
    }
}
