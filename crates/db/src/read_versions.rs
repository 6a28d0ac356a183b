//! Change signals for read caches (migration `m20261206_000031_read_versions`): which *area* of
//! cached reads a committed write may have changed.
//!
//! - SQLite: one counter per area, bumped by triggers inside every writing transaction (of this
//!   process or any other); equal counters mean nothing changed. [`SqliteVersions`] reads them
//!   on a connection of its own, synchronously (microseconds, where a query through the pool
//!   costs as much as a whole cached gRPC read); [`sqlite_versions`] through the pool, for a
//!   database without a file.
//! - PostgreSQL: [`ChangeListener`] receives a notification per area from each committed
//!   transaction that wrote to it (statement triggers call `pg_notify`), on a connection of its
//!   own.

use sea_orm::sqlx::{self, postgres::PgListener};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};

use crate::DbError;

/// The notification channel the PostgreSQL triggers write to.
const CHANNEL: &str = "sharpsend_reads";

/// A group of tables cached reads depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Area {
    /// `segments` and `managed_segments`: GetSegment, ListSegments.
    Segments,
    /// `profiles`: GetProfile from the mirror.
    Profiles,
    /// `sends`, `send_submissions`, `send_history`: GetSend.
    Sends,
    /// `analytics_deliveries` (migration 000095): a person's delivery history in GetProfile.
    Deliveries,
}

/// Counters or generations of every area, in [`Area::ALL`] order.
pub type Versions = [i64; Area::COUNT];

impl Area {
    pub const COUNT: usize = 4;
    pub const ALL: [Area; Area::COUNT] = [
        Area::Segments,
        Area::Profiles,
        Area::Sends,
        Area::Deliveries,
    ];

    /// The area's name in `read_versions` and in notifications.
    pub fn name(self) -> &'static str {
        match self {
            Area::Segments => "segments",
            Area::Profiles => "profiles",
            Area::Sends => "sends",
            Area::Deliveries => "deliveries",
        }
    }

    /// Position in [`Area::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn from_name(name: &str) -> Option<Area> {
        Area::ALL.into_iter().find(|a| a.name() == name)
    }
}

const SELECT_VERSIONS: &str = "SELECT area, version FROM read_versions";

/// The counters of [`SELECT_VERSIONS`]' `(area, version)` rows; rows of unknown areas are
/// skipped, areas without a row count 0.
fn versions_of<E>(rows: impl IntoIterator<Item = Result<(String, i64), E>>) -> Result<Versions, E> {
    let mut versions = Versions::default();
    for row in rows {
        let (area, version) = row?;
        if let Some(area) = Area::from_name(&area) {
            versions[area.index()] = version;
        }
    }
    Ok(versions)
}

/// SQLite: the change counter of every area as committed now, through the pool.
pub async fn sqlite_versions(db: &DatabaseConnection) -> Result<Versions, DbError> {
    let rows = db
        .query_all_raw(Statement::from_string(DbBackend::Sqlite, SELECT_VERSIONS))
        .await?;
    Ok(versions_of(rows.iter().map(|row| {
        Ok::<_, DbErr>((row.try_get("", "area")?, row.try_get("", "version")?))
    }))?)
}

/// How long a counter read waits on a lock before the cache is skipped for that read.
const SQLITE_READ_BUSY: std::time::Duration = std::time::Duration::from_millis(50);

/// SQLite: a connection of its own to a database file that reads the change counters
/// synchronously. It never writes (`query_only`). Under WAL a read never waits for writers, so a
/// call costs a few microseconds; it is made inside async code like taking a lock.
pub struct SqliteVersions {
    conn: std::sync::Mutex<rusqlite::Connection>,
}

impl SqliteVersions {
    /// Opens a reader for `db`'s file; `None` for PostgreSQL and for a database without a file
    /// (`sqlite::memory:`, read through the pool instead).
    pub fn open(db: &DatabaseConnection) -> Result<Option<Self>, DbError> {
        if db.get_database_backend() != DbBackend::Sqlite {
            return Ok(None);
        }
        let options = db.get_sqlite_connection_pool().connect_options();
        let path = options.get_filename();
        if !path.is_file() {
            return Ok(None);
        }
        let conn = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(rusqlite_err)?;
        conn.busy_timeout(SQLITE_READ_BUSY).map_err(rusqlite_err)?;
        conn.pragma_update(None, "query_only", true)
            .map_err(rusqlite_err)?;
        Ok(Some(Self {
            conn: std::sync::Mutex::new(conn),
        }))
    }

    /// The change counter of every area as committed now.
    pub fn read(&self) -> Result<Versions, DbError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| DbError::Db(DbErr::Custom("read_versions reader poisoned".into())))?;
        let mut statement = conn.prepare_cached(SELECT_VERSIONS).map_err(rusqlite_err)?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(rusqlite_err)?;
        versions_of(rows).map_err(rusqlite_err)
    }
}

fn rusqlite_err(e: rusqlite::Error) -> DbError {
    DbError::Db(DbErr::Custom(format!("reading read_versions: {e}")))
}

/// What [`ChangeListener::next`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A transaction that wrote to this area committed.
    Area(Area),
    /// The connection was lost: notifications may have been missed. Listen again.
    Lost,
}

/// PostgreSQL: a connection listening for committed changes.
pub struct ChangeListener {
    listener: PgListener,
}

impl ChangeListener {
    /// Opens a connection of its own (from `db`'s settings) and starts listening; changes
    /// committed after this returns are all reported.
    pub async fn listen(db: &DatabaseConnection) -> Result<Self, DbError> {
        let pool = db.get_postgres_connection_pool();
        let mut listener = PgListener::connect_with(pool).await.map_err(sqlx_err)?;
        listener.listen(CHANNEL).await.map_err(sqlx_err)?;
        Ok(Self { listener })
    }

    /// Waits for the next change. Unknown payloads are skipped.
    pub async fn next(&mut self) -> Result<Change, DbError> {
        loop {
            match self.listener.try_recv().await.map_err(sqlx_err)? {
                None => return Ok(Change::Lost),
                Some(n) => {
                    if let Some(area) = Area::from_name(n.payload()) {
                        return Ok(Change::Area(area));
                    }
                }
            }
        }
    }
}

fn sqlx_err(e: sqlx::Error) -> DbError {
    DbError::Db(DbErr::Conn(sea_orm::RuntimeErr::SqlxError(e.into())))
}
