//! Change signals for read caches (migration `m20261206_000031_read_versions`): which *area* of
//! cached reads a committed write may have changed.
//!
//! - SQLite: [`sqlite_versions`] reads one counter per area, bumped by triggers inside every
//!   writing transaction (of this process or any other); equal counters mean nothing changed.
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
}

impl Area {
    pub const ALL: [Area; 3] = [Area::Segments, Area::Profiles, Area::Sends];

    /// The area's name in `read_versions` and in notifications.
    pub fn name(self) -> &'static str {
        match self {
            Area::Segments => "segments",
            Area::Profiles => "profiles",
            Area::Sends => "sends",
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

/// SQLite: the change counter of every area, in [`Area::ALL`] order, as committed now.
pub async fn sqlite_versions(db: &DatabaseConnection) -> Result<[i64; 3], DbError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT area, version FROM read_versions",
        ))
        .await?;
    let mut versions = [0i64; 3];
    for row in rows {
        let area: String = row.try_get("", "area")?;
        if let Some(area) = Area::from_name(&area) {
            versions[area.index()] = row.try_get("", "version")?;
        }
    }
    Ok(versions)
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
