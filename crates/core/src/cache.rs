//! A read-through cache for the hot reads (GetSegment, ListSegments, GetProfile from the mirror
//! with its delivery history, GetSend), so a repeated read costs no database round trip: on
//! SQLite one synchronous read of the change counters on a connection of the cache's own
//! (microseconds), instead of the two to four queries of the read itself.
//!
//! **Never stale after a committed write.** Every cached value carries the *stamp* of its area
//! (`sharpsend_db::read_versions::Area`) taken *before* it was loaded; it is served only while
//! the area's stamp is unchanged:
//! - SQLite: the stamp is the area's change counter, bumped by triggers inside every writing
//!   transaction of any process, read once per cached read (`SqliteVersions`). Strict.
//! - PostgreSQL: the stamp is a local generation, bumped by a listener when PostgreSQL delivers
//!   the notification a committed write sends (statement triggers, any process), and bumped for
//!   every area by [`ReadCache::invalidate_all`], which the server calls after each call that
//!   may write has finished (so this server's own writes are visible to the next read at once).
//!   Another process's write is visible once its notification arrives (sub-millisecond after the
//!   commit, on the same machine). While the listener is not connected nothing is cached, and a
//!   lost connection invalidates everything.
//!
//! The cache is off until [`ReadCache::start`] (the server calls it while serving), so library
//! code and tests that read and write through the same [`crate::AppContext`] always read the
//! database. Each area keeps at most [`MAX_ENTRIES`] values and is emptied when full.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use sharpsend_db::{
    DatabaseConnection, DbBackend,
    analytics::DeliveryRow,
    read_versions::{Area, Change, ChangeListener, SqliteVersions},
};
use tokio::task::JoinHandle;

use crate::{
    CoreError, paging::Page, profiles::CustomerRef, segments::SegmentFilter, segments::SegmentView,
    sends::SendKey, sends::SendView,
};

/// Values kept per cached read kind before the map is emptied.
pub const MAX_ENTRIES: usize = 4096;
/// Wait before listening again after the PostgreSQL listener lost its connection.
const RELISTEN_DELAY: Duration = Duration::from_millis(500);

/// The key of a cached ListSegments page.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PageKey {
    pub filter: SegmentFilter,
    pub after: Option<i64>,
    pub limit: u64,
}

/// The read cache of one process; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct ReadCache {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    enabled: AtomicBool,
    /// PostgreSQL: the listener is connected (nothing is cached otherwise).
    listening: AtomicBool,
    generations: [AtomicU64; Area::COUNT],
    /// SQLite with a file: the counters' own reader (without one, they are read through the pool).
    sqlite: RwLock<Option<SqliteVersions>>,
    // Keys start with the workspace id: one cache serves every workspace of the process.
    segments: Shelf<(i64, i64), SegmentView>,
    segment_pages: Shelf<(i64, PageKey), Page<SegmentView, i64>>,
    profiles: Shelf<(i64, CustomerRef), sharpsend_db::profiles::Profile>,
    sends: Shelf<(i64, SendKey), SendView>,
    deliveries: Shelf<(i64, HistoryKey), Vec<DeliveryRow>>,
}

/// The key of a cached page of one person's delivery history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HistoryKey {
    pub customer_id: String,
    pub before_first_id: Option<i64>,
    pub limit: u64,
}

/// One kind of cached read: values with the stamp they were loaded under. Values are shared, so
/// the lock is held only to find one (a hit is shared with its caller, never copied).
struct Shelf<K, V> {
    map: Mutex<HashMap<K, (u64, Arc<V>)>>,
}

impl<K, V> Default for Shelf<K, V> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq, V> Shelf<K, V> {
    fn get(&self, key: &K, stamp: u64) -> Option<Arc<V>> {
        let map = self.map.lock().ok()?;
        map.get(key)
            .filter(|(s, _)| *s == stamp)
            .map(|(_, v)| Arc::clone(v))
    }

    fn put(&self, key: K, stamp: u64, value: Arc<V>) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
                map.clear();
            }
            map.insert(key, (stamp, value));
        }
    }

    fn clear(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.clear();
        }
    }
}

impl ReadCache {
    /// Turns the cache on for `db` until the returned task is aborted (then call [`stop`]).
    /// On PostgreSQL the task listens for committed changes; on SQLite it has nothing to do.
    ///
    /// [`stop`]: ReadCache::stop
    pub fn start(&self, db: &DatabaseConnection) -> Option<JoinHandle<()>> {
        self.invalidate_all();
        let reader = SqliteVersions::open(db).unwrap_or_else(|e| {
            tracing::warn!(error = %crate::error::error_chain(&e), "read cache cannot open its SQLite reader; change counters are read through the pool");
            None
        });
        if let Ok(mut slot) = self.inner.sqlite.write() {
            *slot = reader;
        }
        self.inner.enabled.store(true, Ordering::SeqCst);
        match db.get_database_backend() {
            DbBackend::Postgres => Some(tokio::spawn(listen(self.inner.clone(), db.clone()))),
            _ => None,
        }
    }

    /// Turns the cache off and empties it.
    pub fn stop(&self) {
        self.inner.enabled.store(false, Ordering::SeqCst);
        self.inner.listening.store(false, Ordering::SeqCst);
        self.invalidate_all();
        if let Ok(mut slot) = self.inner.sqlite.write() {
            *slot = None;
        }
        self.inner.segments.clear();
        self.inner.segment_pages.clear();
        self.inner.profiles.clear();
        self.inner.sends.clear();
        self.inner.deliveries.clear();
    }

    /// Forgets every cached value (called after a call that may have written has finished).
    pub fn invalidate_all(&self) {
        for generation in &self.inner.generations {
            generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn invalidate(&self, area: Area) {
        self.inner.generations[area.index()].fetch_add(1, Ordering::SeqCst);
    }

    /// The current stamp of `area`, or `None` when values must not be cached now.
    async fn stamp(&self, db: &DatabaseConnection, area: Area) -> Option<u64> {
        if !self.inner.enabled.load(Ordering::SeqCst) {
            return None;
        }
        match db.get_database_backend() {
            DbBackend::Postgres => self
                .inner
                .listening
                .load(Ordering::SeqCst)
                .then(|| self.inner.generations[area.index()].load(Ordering::SeqCst)),
            // A failed read of the counters only skips the cache; the read itself reports.
            _ => {
                // The reader's read is synchronous: the lock is let go before any await.
                let read = match self.inner.sqlite.read() {
                    Ok(slot) => slot.as_ref().map(|reader| reader.read().ok()),
                    Err(_) => None,
                };
                let versions = match read {
                    Some(versions) => versions,
                    None => sharpsend_db::read_versions::sqlite_versions(db).await.ok(),
                };
                versions.map(|v| v[area.index()] as u64)
            }
        }
    }

    async fn read_through<K, V, F, Fut>(
        &self,
        db: &DatabaseConnection,
        area: Area,
        shelf: impl Fn(&Inner) -> &Shelf<K, V>,
        key: K,
        load: F,
    ) -> Result<Arc<V>, CoreError>
    where
        K: Hash + Eq,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, CoreError>>,
    {
        let Some(stamp) = self.stamp(db, area).await else {
            return load().await.map(Arc::new);
        };
        if let Some(hit) = shelf(&self.inner).get(&key, stamp) {
            return Ok(hit);
        }
        let value = Arc::new(load().await?);
        shelf(&self.inner).put(key, stamp, Arc::clone(&value));
        Ok(value)
    }

    pub(crate) async fn segment<F, Fut>(
        &self,
        db: &DatabaseConnection,
        workspace: i64,
        id: i64,
        load: F,
    ) -> Result<Arc<SegmentView>, CoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SegmentView, CoreError>>,
    {
        self.read_through(db, Area::Segments, |i| &i.segments, (workspace, id), load)
            .await
    }

    pub(crate) async fn segment_page<F, Fut>(
        &self,
        db: &DatabaseConnection,
        workspace: i64,
        key: PageKey,
        load: F,
    ) -> Result<Arc<Page<SegmentView, i64>>, CoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Page<SegmentView, i64>, CoreError>>,
    {
        self.read_through(
            db,
            Area::Segments,
            |i| &i.segment_pages,
            (workspace, key),
            load,
        )
        .await
    }

    pub(crate) async fn profile<F, Fut>(
        &self,
        db: &DatabaseConnection,
        workspace: i64,
        who: CustomerRef,
        load: F,
    ) -> Result<Arc<sharpsend_db::profiles::Profile>, CoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<sharpsend_db::profiles::Profile, CoreError>>,
    {
        self.read_through(db, Area::Profiles, |i| &i.profiles, (workspace, who), load)
            .await
    }

    pub(crate) async fn send<F, Fut>(
        &self,
        db: &DatabaseConnection,
        workspace: i64,
        key: SendKey,
        load: F,
    ) -> Result<Arc<SendView>, CoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SendView, CoreError>>,
    {
        self.read_through(db, Area::Sends, |i| &i.sends, (workspace, key), load)
            .await
    }

    pub(crate) async fn delivery_rows<F, Fut>(
        &self,
        db: &DatabaseConnection,
        workspace: i64,
        key: HistoryKey,
        load: F,
    ) -> Result<Arc<Vec<DeliveryRow>>, CoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<DeliveryRow>, CoreError>>,
    {
        self.read_through(
            db,
            Area::Deliveries,
            |i| &i.deliveries,
            (workspace, key),
            load,
        )
        .await
    }
}

/// PostgreSQL: bumps an area's generation for each committed change; while not connected
/// nothing is cached, and (re)connecting invalidates everything.
async fn listen(inner: Arc<Inner>, db: DatabaseConnection) {
    let cache = ReadCache {
        inner: inner.clone(),
    };
    loop {
        match ChangeListener::listen(&db).await {
            Ok(mut listener) => {
                inner.listening.store(true, Ordering::SeqCst);
                cache.invalidate_all();
                tracing::debug!("read cache listening for committed changes");
                loop {
                    match listener.next().await {
                        Ok(Change::Area(area)) => cache.invalidate(area),
                        Ok(Change::Lost) => {
                            tracing::warn!("read cache lost its change listener; reconnecting");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %crate::error::error_chain(&e), "read cache change listener failed; reconnecting");
                            break;
                        }
                    }
                }
                inner.listening.store(false, Ordering::SeqCst);
                cache.invalidate_all();
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "read cache cannot listen for changes; reads go to the database");
            }
        }
        tokio::time::sleep(RELISTEN_DELAY).await;
    }
}
