//! Registry storage: one code path (sqlx's `Any` driver, portable SQL only) over SQLite, the
//! default, and PostgreSQL, for several stateless registry instances on one database.
//!
//! SQLite runs in WAL mode with `synchronous=NORMAL`: a committed write survives the process
//! being killed (kill -9) because it is in the WAL when the commit returns; only a power cut
//! may lose the last commits. No write is acknowledged before the transaction holding it
//! committed, so an acknowledged record is stored.
//!
//! Writes go through one writer task that commits whatever has queued up meanwhile in one
//! transaction (group commit): concurrent heartbeats then cost one commit (and on PostgreSQL
//! one fsync) between them, instead of each its own, and SQLite writers never wait on each
//! other's locks in `busy_timeout` sleeps. A batch that fails is rolled back and its writes are
//! applied one by one, so each gets its own answer.
//!
//! A delete keeps a tombstone (with its seq) until the clock window has passed, so a captured
//! registration cannot be replayed to bring a deleted record back.

use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Executor as _, Row as _};
use tokio::sync::{mpsc, oneshot};

use super::record::{Record, SignedRecord, Stored};

/// Most records one look-up page returns.
pub const MAX_PAGE: u32 = 500;

/// Most writes one group commit holds.
const MAX_BATCH: usize = 256;
/// Writes queued for the writer before callers wait for room (back-pressure).
const QUEUE: usize = 4096;

/// Portable schema (SQLite and PostgreSQL): `BIGINT` and `TEXT` mean the same to both. SQLite
/// stores the model index without rowids (see [`Store::open`]): the by-model look-up is then
/// served from that table's own b-tree.
const SCHEMA: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS registry_records (
        public_key TEXT PRIMARY KEY,
        node_id TEXT NOT NULL UNIQUE,
        endpoint TEXT NOT NULL,
        models TEXT NOT NULL,
        seq BIGINT NOT NULL,
        issued_at BIGINT NOT NULL,
        expires BIGINT NOT NULL,
        signature TEXT NOT NULL,
        reachable BIGINT NOT NULL,
        deleted BIGINT NOT NULL
    )",
    // Covers the live count (a metric) and the purge without reading the table.
    "CREATE INDEX IF NOT EXISTS registry_records_live ON registry_records (expires, deleted)",
    "CREATE TABLE IF NOT EXISTS registry_models (
        model TEXT NOT NULL,
        public_key TEXT NOT NULL,
        PRIMARY KEY (model, public_key)
    )",
    "CREATE INDEX IF NOT EXISTS registry_models_key ON registry_models (public_key)",
    // Superseded by `registry_records_live` (databases made before it had this one).
    "DROP INDEX IF EXISTS registry_records_expires",
];

/// Insert or replace a record, only when its seq is above the stored one (tombstones included).
const UPSERT: &str = "INSERT INTO registry_records
        (public_key, node_id, endpoint, models, seq, issued_at, expires, signature,
         reachable, deleted)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0)
     ON CONFLICT (public_key) DO UPDATE SET
        node_id = excluded.node_id, endpoint = excluded.endpoint,
        models = excluded.models, seq = excluded.seq, issued_at = excluded.issued_at,
        expires = excluded.expires, signature = excluded.signature,
        reachable = excluded.reachable, deleted = 0
     WHERE registry_records.seq < excluded.seq";

/// A heartbeat that changes nothing but the signing metadata: applied only when the stored
/// record has this node id, endpoint and models, was reached, is not deleted and holds a lower
/// seq. These conditions are the stored-state checks of a write, so a heartbeat needs no read.
const HEARTBEAT: &str = "UPDATE registry_records
     SET seq = $5, issued_at = $6, expires = $7, signature = $8
     WHERE public_key = $1 AND node_id = $2 AND endpoint = $3 AND models = $4
       AND reachable = 1 AND deleted = 0 AND seq < $5";

const COLUMNS: &str =
    "r.node_id, r.public_key, r.endpoint, r.models, r.seq, r.issued_at, r.expires, r.signature, r.reachable";

/// A storage failure (the database, not the record).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("registry database: {0}")]
    Db(#[from] sqlx::Error),
    /// The URL names no supported database.
    #[error("registry database url `{0}`: expected sqlite:PATH or postgres://...")]
    Url(String),
    /// The writer task ended (the store is closing).
    #[error("registry database: the writer has stopped")]
    WriterGone,
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored.
    Stored,
    /// A concurrent write stored this seq or a higher one first.
    Replay,
    /// The node id is bound to another key (a concurrent write took it).
    NodeIdTaken,
}

/// A listed record: the signed record and whether the registry reached its endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    /// The record with the node's signature, as the node sent it (verifiable by anyone).
    #[serde(flatten)]
    pub signed: SignedRecord,
    /// Whether the registry's mutual-TLS hello to the endpoint proved the key.
    pub reachable: bool,
}

/// The registry's records.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    postgres: bool,
    /// The writer task's queue: every write goes through it (group commit).
    writes: mpsc::Sender<Job>,
}

/// A write the writer applies.
#[derive(Debug)]
enum Write {
    /// Upsert a validated record; rewrite its model index when `index_models`.
    Put {
        signed: SignedRecord,
        models: String,
        reachable: bool,
        index_models: bool,
    },
    /// A heartbeat of an unchanged, reached record (see [`HEARTBEAT`]).
    Heartbeat {
        signed: SignedRecord,
        models: String,
    },
    /// Replace a record by a tombstone.
    Delete {
        public_key: String,
        seq: u64,
        keep_until: u64,
    },
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    Put(PutOutcome),
    Deleted(bool),
    Heartbeat(bool),
}

/// A message to the writer task.
#[derive(Debug)]
enum Job {
    /// Apply, then answer once committed.
    Write(Write, oneshot::Sender<Result<Done, StoreError>>),
    /// Answer once everything queued before has been committed.
    Flush(oneshot::Sender<()>),
}

fn as_i64(v: u64) -> i64 {
    // Validation refuses values above i64::MAX; saturating keeps a bug from wrapping negative.
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn as_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store {
    /// Opens (creating) the database at `url`: `sqlite:PATH` (the file is created) or
    /// `postgres://user@host:port/db` (also `?host=/socket/dir`).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        let url = if postgres {
            url.to_string()
        } else if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.trim_start_matches("//");
            format!("sqlite://{path}?mode=rwc")
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        let options = AnyPoolOptions::new()
            .max_connections(if postgres { 16 } else { 4 })
            .acquire_timeout(Duration::from_secs(10));
        let options = if postgres {
            options
        } else {
            options.after_connect(|conn, _| {
                Box::pin(async move {
                    // busy_timeout: another process on the same file (a CLI, a bulk import)
                    // is waited for rather than failed. cache_size: the default 2 MiB page
                    // cache holds a sliver of a million-record database, and every look-up
                    // and insert went to the OS for b-tree pages (64 MiB per connection).
                    // mmap_size: a reader's page cache is emptied whenever another connection
                    // wrote (every heartbeat), and a profile showed look-ups copying pages in
                    // with pread again each time; mapped pages are read in place.
                    conn.execute(
                        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; \
                         PRAGMA busy_timeout=10000; PRAGMA cache_size=-65536; \
                         PRAGMA mmap_size=1073741824",
                    )
                    .await?;
                    Ok(())
                })
            })
        };
        let pool = options.connect(&url).await?;
        for statement in SCHEMA {
            if !postgres && statement.starts_with("CREATE TABLE IF NOT EXISTS registry_models") {
                // The model index is all key: without rowids it is one b-tree, not two.
                pool.execute(format!("{statement} WITHOUT ROWID").as_str())
                    .await?;
            } else {
                pool.execute(statement).await?;
            }
        }
        let (writes, queue) = mpsc::channel(QUEUE);
        tokio::spawn(writer(pool.clone(), queue));
        Ok(Store {
            pool,
            postgres,
            writes,
        })
    }

    /// Hands a write to the writer task and waits until it is committed.
    async fn write(&self, write: Write) -> Result<Done, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writes
            .send(Job::Write(write, tx))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Whether this store is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The journal mode SQLite reports (`wal`), or `None` on PostgreSQL.
    pub async fn journal_mode(&self) -> Result<Option<String>, StoreError> {
        if self.postgres {
            return Ok(None);
        }
        let row = sqlx::query("PRAGMA journal_mode")
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(row.try_get::<String, _>(0)?))
    }

    /// What is stored for `public_key` (including a tombstone), and the key `node_id` is bound
    /// to: the inputs of [`super::record::validate_write`].
    pub async fn binding(
        &self,
        public_key: &str,
        node_id: &str,
    ) -> Result<(Option<Stored>, Option<String>), StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, public_key, seq, endpoint, reachable, deleted, models FROM registry_records
             WHERE public_key = $1 OR node_id = $2",
        )
        .bind(public_key)
        .bind(node_id)
        .fetch_all(&self.pool)
        .await?;
        let mut stored = None;
        let mut owner = None;
        for row in rows {
            let s = Stored {
                node_id: row.try_get(0)?,
                public_key: row.try_get(1)?,
                seq: as_u64(row.try_get(2)?),
                endpoint: row.try_get(3)?,
                reachable: row.try_get::<i64, _>(4)? != 0 && row.try_get::<i64, _>(5)? == 0,
                models: row.try_get(6)?,
            };
            if s.node_id == node_id {
                owner = Some(s.public_key.clone());
            }
            if s.public_key == public_key {
                stored = Some(s);
            }
        }
        Ok((stored, owner))
    }

    /// Stores a validated record, only if its seq is above the stored one (a concurrent writer
    /// may have won since validation). `stored_models` is what [`Store::binding`] read: when the
    /// models did not change (a heartbeat), the model index is left alone. Returns once the
    /// write is committed.
    pub async fn put(
        &self,
        signed: &SignedRecord,
        reachable: bool,
        stored_models: Option<&str>,
    ) -> Result<PutOutcome, StoreError> {
        let models = signed.record.canonical_models();
        let index_models = stored_models != Some(models.as_str());
        let write = Write::Put {
            signed: signed.clone(),
            models,
            reachable,
            index_models,
        };
        match self.write(write).await? {
            Done::Put(outcome) => Ok(outcome),
            Done::Deleted(_) | Done::Heartbeat(_) => Err(StoreError::WriterGone),
        }
    }

    /// Applies a validated heartbeat without reading first: true when the stored record has
    /// the same node id, endpoint and models, was reached, and holds a lower seq (the common
    /// case, one statement in a group commit). False when anything differs: the caller then
    /// takes the full path ([`Store::binding`], checks, [`Store::put`]).
    pub async fn heartbeat(&self, signed: &SignedRecord) -> Result<bool, StoreError> {
        let write = Write::Heartbeat {
            models: signed.record.canonical_models(),
            signed: signed.clone(),
        };
        match self.write(write).await? {
            Done::Heartbeat(applied) => Ok(applied),
            Done::Put(_) | Done::Deleted(_) => Err(StoreError::WriterGone),
        }
    }

    /// Stores many records in one transaction per 1,000 (bulk import, benchmarks), without the
    /// writer task; records whose seq is not above the stored one are skipped. Returns how
    /// many were stored.
    pub async fn put_many(
        &self,
        records: &[SignedRecord],
        reachable: bool,
    ) -> Result<u64, StoreError> {
        let mut stored = 0;
        for chunk in records.chunks(1000) {
            let mut tx = self.pool.begin().await?;
            for signed in chunk {
                let write = Write::Put {
                    signed: signed.clone(),
                    models: signed.record.canonical_models(),
                    reachable,
                    index_models: true,
                };
                if apply(&mut tx, &write).await? == Done::Put(PutOutcome::Stored) {
                    stored += 1;
                }
            }
            tx.commit().await?;
        }
        Ok(stored)
    }

    /// Replaces the record of `public_key` by a tombstone holding `seq` until `keep_until`, so
    /// the deleted record vanishes from look-ups and cannot be replayed back. False when a
    /// concurrent write holds a seq at or above `seq`.
    pub async fn delete(
        &self,
        public_key: &str,
        seq: u64,
        keep_until: u64,
    ) -> Result<bool, StoreError> {
        let write = Write::Delete {
            public_key: public_key.to_string(),
            seq,
            keep_until,
        };
        match self.write(write).await? {
            Done::Deleted(deleted) => Ok(deleted),
            Done::Put(_) | Done::Heartbeat(_) => Err(StoreError::WriterGone),
        }
    }

    /// Removes records (and tombstones) that expired before `now`; returns how many.
    pub async fn purge_expired(&self, now: u64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM registry_models WHERE public_key IN
                (SELECT public_key FROM registry_records WHERE expires <= $1)",
        )
        .bind(as_i64(now))
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("DELETE FROM registry_records WHERE expires <= $1")
            .bind(as_i64(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Listed records (live, not deleted, reachable) after the key `after`, in key order, at
    /// most `limit` (capped at [`MAX_PAGE`]). Key order is stable across pages and writes.
    pub async fn list(&self, after: &str, limit: u32, now: u64) -> Result<Vec<Listed>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM registry_records r
             WHERE r.public_key > $1 AND r.deleted = 0 AND r.reachable = 1 AND r.expires > $2
             ORDER BY r.public_key LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(after)
            .bind(as_i64(now))
            .bind(i64::from(limit.clamp(1, MAX_PAGE)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(listed).collect()
    }

    /// Listed records advertising `model`, in key order after `after`.
    pub async fn by_model(
        &self,
        model: &str,
        after: &str,
        limit: u32,
        now: u64,
    ) -> Result<Vec<Listed>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM registry_models m
             JOIN registry_records r ON r.public_key = m.public_key
             WHERE m.model = $1 AND m.public_key > $2
               AND r.deleted = 0 AND r.reachable = 1 AND r.expires > $3
             ORDER BY m.public_key LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(model)
            .bind(after)
            .bind(as_i64(now))
            .bind(i64::from(limit.clamp(1, MAX_PAGE)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(listed).collect()
    }

    /// The live record of a key or node id, listed or not (its owner asks for its status; a
    /// look-up by key tells whether it is reachable).
    pub async fn get(&self, key_or_id: &str, now: u64) -> Result<Option<Listed>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM registry_records r
             WHERE (r.public_key = $1 OR r.node_id = $1) AND r.deleted = 0 AND r.expires > $2"
        );
        let row = sqlx::query(&sql)
            .bind(key_or_id)
            .bind(as_i64(now))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(listed).transpose()
    }

    /// Live records, listed or not (a metric).
    pub async fn count_live(&self, now: u64) -> Result<u64, StoreError> {
        let row =
            sqlx::query("SELECT COUNT(*) FROM registry_records WHERE deleted = 0 AND expires > $1")
                .bind(as_i64(now))
                .fetch_one(&self.pool)
                .await?;
        Ok(as_u64(row.try_get(0)?))
    }

    /// Commits every write queued so far, then closes the pool.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writes.send(Job::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.pool.close().await;
    }
}

/// The writer task: takes what has queued up (at most [`MAX_BATCH`]) and commits it in one
/// transaction; ends when every [`Store`] clone is gone.
async fn writer(pool: AnyPool, mut queue: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let mut writes = Vec::with_capacity(jobs.len());
        let mut flushes = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Write(w, reply) => writes.push((w, reply)),
                Job::Flush(reply) => flushes.push(reply),
            }
        }
        commit(&pool, writes).await;
        for reply in flushes {
            let _ = reply.send(());
        }
    }
}

type Reply = oneshot::Sender<Result<Done, StoreError>>;

/// Commits `writes` as one transaction and answers each; if anything in it fails (a unique
/// violation from a concurrent binding, a database error), rolls back and applies them one by
/// one so each gets its own answer. A caller that went away is simply not answered: its write
/// is committed all the same.
async fn commit(pool: &AnyPool, writes: Vec<(Write, Reply)>) {
    if writes.len() > 1 {
        match in_one_transaction(pool, writes.iter().map(|(w, _)| w)).await {
            Ok(done) => {
                for ((_, reply), d) in writes.into_iter().zip(done) {
                    let _ = reply.send(Ok(d));
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = writes.len(), "group commit failed; applying its writes one by one");
            }
        }
    }
    for (write, reply) in writes {
        let done = match in_one_transaction(pool, std::iter::once(&write)).await {
            Ok(mut d) => d.pop().ok_or(StoreError::WriterGone),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Ok(Done::Put(PutOutcome::NodeIdTaken))
            }
            Err(e) => Err(StoreError::from(e)),
        };
        let _ = reply.send(done);
    }
}

async fn in_one_transaction<'a>(
    pool: &AnyPool,
    writes: impl Iterator<Item = &'a Write>,
) -> Result<Vec<Done>, sqlx::Error> {
    let writes: Vec<&Write> = writes.collect();
    let mut tx = pool.begin().await?;
    let mut done: Vec<Option<Done>> = vec![None; writes.len()];
    // The heartbeats of a batch go in one statement: each statement is a round trip to the
    // database (for SQLite, to its worker thread), and that hand-off cost more than the update.
    // A heartbeat that does not apply takes the full path afterwards, so running them ahead
    // of the batch's other writes changes no outcome a node could rely on.
    let beats: Vec<usize> = (0..writes.len())
        .filter(|&i| matches!(writes[i], Write::Heartbeat { .. }))
        .collect();
    if beats.len() > 1 {
        for (i, applied) in heartbeats(&mut tx, &writes, &beats).await? {
            done[i] = Some(Done::Heartbeat(applied));
        }
    }
    for (i, w) in writes.iter().enumerate() {
        if done[i].is_none() {
            done[i] = Some(apply(&mut tx, w).await?);
        }
    }
    tx.commit().await?;
    Ok(done.into_iter().flatten().collect())
}

/// Most heartbeats in one statement (8 bound values each).
const BEATS_PER_STATEMENT: usize = 128;

/// Applies the heartbeats `writes[i]` for `i` in `beats` with one `UPDATE ... FROM (VALUES
/// ...) RETURNING` per [`BEATS_PER_STATEMENT`] distinct keys (a key twice in a batch goes in
/// a later statement, so each row is matched by one heartbeat): whether each applied.
async fn heartbeats(
    conn: &mut AnyConnection,
    writes: &[&Write],
    beats: &[usize],
) -> Result<Vec<(usize, bool)>, sqlx::Error> {
    let mut out = Vec::with_capacity(beats.len());
    let mut pending: Vec<usize> = beats.to_vec();
    while !pending.is_empty() {
        let mut keys = std::collections::HashSet::new();
        let mut now = Vec::new();
        let mut later = Vec::new();
        for i in pending {
            let Write::Heartbeat { signed, .. } = writes[i] else {
                continue;
            };
            if now.len() < BEATS_PER_STATEMENT && keys.insert(signed.record.public_key.as_str()) {
                now.push(i);
            } else {
                later.push(i);
            }
        }
        let mut sql = String::from(
            "UPDATE registry_records SET seq = v.column5, issued_at = v.column6, \
             expires = v.column7, signature = v.column8 FROM (VALUES ",
        );
        for n in 0..now.len() {
            if n > 0 {
                sql.push_str(", ");
            }
            let p = 8 * n;
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
                p + 6,
                p + 7,
                p + 8
            ));
        }
        sql.push_str(
            ") AS v WHERE registry_records.public_key = v.column1 \
             AND registry_records.node_id = v.column2 AND registry_records.endpoint = v.column3 \
             AND registry_records.models = v.column4 AND registry_records.reachable = 1 \
             AND registry_records.deleted = 0 AND registry_records.seq < v.column5 \
             RETURNING registry_records.public_key",
        );
        let mut query = sqlx::query(&sql);
        for &i in &now {
            if let Write::Heartbeat { signed, models } = writes[i] {
                query = bind_record(query, signed, models);
            }
        }
        let rows = query.fetch_all(&mut *conn).await?;
        let mut applied = std::collections::HashSet::new();
        for row in &rows {
            applied.insert(row.try_get::<String, _>(0)?);
        }
        for &i in &now {
            if let Write::Heartbeat { signed, .. } = writes[i] {
                out.push((i, applied.contains(&signed.record.public_key)));
            }
        }
        pending = later;
    }
    Ok(out)
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds a record's eight columns in the order [`UPSERT`], [`HEARTBEAT`] and the batched
/// heartbeat number them: key, node id, endpoint, models, seq, issued-at, expiry, signature.
fn bind_record<'q>(query: AnyQuery<'q>, signed: &'q SignedRecord, models: &'q str) -> AnyQuery<'q> {
    let r = &signed.record;
    query
        .bind(r.public_key.as_str())
        .bind(r.node_id.as_str())
        .bind(r.endpoint.as_str())
        .bind(models)
        .bind(as_i64(r.seq))
        .bind(as_i64(r.issued_at))
        .bind(as_i64(r.expires))
        .bind(signed.signature.as_str())
}

/// One write inside the caller's transaction.
async fn apply(conn: &mut AnyConnection, write: &Write) -> Result<Done, sqlx::Error> {
    match write {
        Write::Put {
            signed,
            models,
            reachable,
            index_models,
        } => {
            let r = &signed.record;
            let upserted = bind_record(sqlx::query(UPSERT), signed, models)
                .bind(i64::from(*reachable))
                .execute(&mut *conn)
                .await?;
            if upserted.rows_affected() == 0 {
                return Ok(Done::Put(PutOutcome::Replay));
            }
            if *index_models {
                index(conn, &r.public_key, models).await?;
            }
            Ok(Done::Put(PutOutcome::Stored))
        }
        Write::Heartbeat { signed, models } => {
            let updated = bind_record(sqlx::query(HEARTBEAT), signed, models)
                .execute(&mut *conn)
                .await?;
            Ok(Done::Heartbeat(updated.rows_affected() == 1))
        }
        Write::Delete {
            public_key,
            seq,
            keep_until,
        } => {
            let updated = sqlx::query(
                "UPDATE registry_records SET deleted = 1, seq = $2, expires = $3, models = '', endpoint = ''
                 WHERE public_key = $1 AND seq < $2",
            )
            .bind(public_key)
            .bind(as_i64(*seq))
            .bind(as_i64(*keep_until))
            .execute(&mut *conn)
            .await?;
            // A stale delete (a newer write won) leaves the live record's index alone.
            if updated.rows_affected() == 0 {
                return Ok(Done::Deleted(false));
            }
            index(conn, public_key, "").await?;
            Ok(Done::Deleted(true))
        }
    }
}

/// Replaces the model index rows of `public_key` by `models` (canonical, `,`-joined), in one
/// multi-row insert.
async fn index(
    conn: &mut AnyConnection,
    public_key: &str,
    models: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM registry_models WHERE public_key = $1")
        .bind(public_key)
        .execute(&mut *conn)
        .await?;
    let names: Vec<&str> = models.split(',').filter(|m| !m.is_empty()).collect();
    // 256 rows per statement keeps far below SQLite's 32,766 bound parameters, whatever
    // `max_models` a registry allows.
    for chunk in names.chunks(256) {
        let mut sql = String::from("INSERT INTO registry_models (model, public_key) VALUES ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${}, ${})", 2 * i + 1, 2 * i + 2));
        }
        let mut insert = sqlx::query(&sql);
        for name in chunk {
            insert = insert.bind(*name).bind(public_key);
        }
        insert.execute(&mut *conn).await?;
    }
    Ok(())
}

fn listed(row: &AnyRow) -> Result<Listed, StoreError> {
    let models: String = row.try_get(3)?;
    Ok(Listed {
        signed: SignedRecord {
            record: Record {
                node_id: row.try_get(0)?,
                public_key: row.try_get(1)?,
                endpoint: row.try_get(2)?,
                models: models
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
                seq: as_u64(row.try_get(4)?),
                issued_at: as_u64(row.try_get(5)?),
                expires: as_u64(row.try_get(6)?),
            },
            signature: row.try_get(7)?,
        },
        reachable: row.try_get::<i64, _>(8)? != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::super::record::{validate_write, Policy, Signer};
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn signed(n: u8, seq: u64, models: &[&str]) -> SignedRecord {
        let s = Signer::from_seed(&[n; 32]).expect("seed");
        Record {
            node_id: format!("node-{n}"),
            public_key: s.public_key().to_string(),
            endpoint: format!("127.0.0.{n}:7443"),
            models: models.iter().map(|m| m.to_string()).collect(),
            seq,
            issued_at: NOW,
            expires: NOW + 600,
        }
        .sign(&s)
    }

    async fn sqlite() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("registry.db").display());
        let store = Store::open(&url).await.expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn sqlite_is_in_wal_mode_and_keeps_records_across_reopen() {
        let (dir, store) = sqlite().await;
        assert_eq!(
            store.journal_mode().await.expect("pragma").as_deref(),
            Some("wal")
        );
        let w = signed(1, 1, &["qwen3:8b"]);
        assert_eq!(
            store.put(&w, true, None).await.expect("put"),
            PutOutcome::Stored
        );
        store.close().await;
        let url = format!("sqlite:{}", dir.path().join("registry.db").display());
        let again = Store::open(&url).await.expect("reopen");
        let got = again.get(&w.record.node_id, NOW).await.expect("get");
        assert_eq!(got.map(|l| l.signed), Some(w));
    }

    #[tokio::test]
    async fn writes_keep_seq_monotonic_and_ids_bound_to_one_key() {
        let (_dir, store) = sqlite().await;
        let w = signed(1, 5, &["a"]);
        store.put(&w, true, None).await.expect("put");
        assert_eq!(
            store.put(&w, true, None).await.expect("same seq"),
            PutOutcome::Replay
        );
        assert_eq!(
            store
                .put(&signed(1, 4, &["a"]), true, None)
                .await
                .expect("lower"),
            PutOutcome::Replay
        );
        let mut thief = signed(2, 1, &["a"]);
        thief.record.node_id = "node-1".into();
        assert_eq!(
            store.put(&thief, true, None).await.expect("thief"),
            PutOutcome::NodeIdTaken
        );
        let (stored, owner) = store
            .binding(&thief.record.public_key, "node-1")
            .await
            .expect("b");
        assert_eq!(stored, None);
        assert_eq!(owner.as_deref(), Some(w.record.public_key.as_str()));
        // The stored binding makes validation refuse what the store would refuse.
        let policy = Policy {
            allow_private: true,
            ..Policy::default()
        };
        let (stored, owner) = store
            .binding(&w.record.public_key, "node-1")
            .await
            .expect("b");
        assert_eq!(
            validate_write(&w, stored.as_ref(), owner.as_deref(), NOW, &policy)
                .map_err(|e| e.code()),
            Err("replay")
        );
    }

    #[tokio::test]
    async fn look_ups_page_in_stable_order_by_model_and_hide_the_unlisted() {
        let (_dir, store) = sqlite().await;
        for n in 1..=9u8 {
            let models: &[&str] = if n % 2 == 0 {
                &["even", "all"]
            } else {
                &["all"]
            };
            store
                .put(&signed(n, 1, models), n != 9, None)
                .await
                .expect("put");
        }
        let mut seen = Vec::new();
        let mut after = String::new();
        loop {
            let page = store.list(&after, 3, NOW).await.expect("list");
            let Some(last) = page.last() else { break };
            after = last.signed.record.public_key.clone();
            seen.extend(page.into_iter().map(|l| l.signed.record.node_id));
        }
        // Node 9 is unreachable, so not listed.
        assert_eq!(seen.len(), 8, "{seen:?}");
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 8);
        let even = store
            .by_model("even", "", 100, NOW)
            .await
            .expect("by model");
        let mut ids: Vec<_> = even
            .iter()
            .map(|l| l.signed.record.node_id.as_str())
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, ["node-2", "node-4", "node-6", "node-8"]);
        assert!(store
            .by_model("none", "", 100, NOW)
            .await
            .expect("none")
            .is_empty());
        // Unlisted, but its owner can still read it.
        let nine = store
            .get("node-9", NOW)
            .await
            .expect("get")
            .expect("present");
        assert!(!nine.reachable);
        // Expired records vanish from look-ups, then purge removes them.
        assert!(store
            .list("", 100, NOW + 600)
            .await
            .expect("list")
            .is_empty());
        assert_eq!(store.purge_expired(NOW + 600).await.expect("purge"), 9);
        assert_eq!(store.count_live(NOW).await.expect("count"), 0);
    }

    #[tokio::test]
    async fn delete_leaves_a_tombstone_that_refuses_replays() {
        let (_dir, store) = sqlite().await;
        let w = signed(1, 5, &["a"]);
        store.put(&w, true, None).await.expect("put");
        assert!(!store
            .delete(&w.record.public_key, 5, NOW + 300)
            .await
            .expect("same seq"));
        assert!(store
            .delete(&w.record.public_key, 6, NOW + 300)
            .await
            .expect("delete"));
        assert!(store.get("node-1", NOW).await.expect("get").is_none());
        assert!(store
            .by_model("a", "", 10, NOW)
            .await
            .expect("model")
            .is_empty());
        assert_eq!(
            store.put(&w, true, None).await.expect("replayed"),
            PutOutcome::Replay
        );
        let (stored, _) = store
            .binding(&w.record.public_key, "node-1")
            .await
            .expect("b");
        assert_eq!(stored.map(|s| s.seq), Some(6));
        assert_eq!(
            store
                .put(&signed(1, 7, &["b"]), true, None)
                .await
                .expect("newer"),
            PutOutcome::Stored
        );
        assert_eq!(
            store.by_model("b", "", 10, NOW).await.expect("model").len(),
            1
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_group_committed_and_each_gets_its_own_answer() {
        let (dir, store) = sqlite().await;
        // 64 writers at once, among them a key stealing node-1's id and a replay: the batch
        // they share fails on the stolen id and is applied one by one.
        store
            .put(&signed(1, 1, &["a"]), true, None)
            .await
            .expect("first");
        let mut tasks = tokio::task::JoinSet::new();
        for n in 2..=64u8 {
            let store = store.clone();
            tasks.spawn(async move {
                let w = signed(n, 1, &["a", "b"]);
                (n, store.put(&w, true, None).await.expect("put"))
            });
        }
        let mut thief = signed(200, 1, &["a"]);
        thief.record.node_id = "node-1".into();
        let (s1, s2) = (store.clone(), store.clone());
        tasks.spawn(async move { (200, s1.put(&thief, true, None).await.expect("thief")) });
        tasks.spawn(async move {
            (
                201,
                s2.put(&signed(1, 1, &["a"]), true, None)
                    .await
                    .expect("replay"),
            )
        });
        let mut answers = std::collections::BTreeMap::new();
        while let Some(a) = tasks.join_next().await {
            let (n, outcome) = a.expect("task");
            answers.insert(n, outcome);
        }
        assert_eq!(answers[&200], PutOutcome::NodeIdTaken);
        assert_eq!(answers[&201], PutOutcome::Replay);
        assert!(
            (2..=64u8).all(|n| answers[&n] == PutOutcome::Stored),
            "{answers:?}"
        );
        assert_eq!(
            store.by_model("b", "", 500, NOW).await.expect("b").len(),
            63
        );
        // Every acknowledged write is on disk: another open of the file sees them all.
        store.close().await;
        let url = format!("sqlite:{}", dir.path().join("registry.db").display());
        let again = Store::open(&url).await.expect("reopen");
        assert_eq!(again.count_live(NOW).await.expect("count"), 64);
        assert_eq!(
            again.by_model("a", "", 500, NOW).await.expect("a").len(),
            64
        );
    }

    #[tokio::test]
    async fn a_heartbeat_applies_only_to_an_unchanged_reached_record_with_a_lower_seq() {
        let (_dir, store) = sqlite().await;
        assert!(!store.heartbeat(&signed(1, 1, &["a"])).await.expect("none"));
        store
            .put(&signed(1, 1, &["a", "b"]), true, None)
            .await
            .expect("put");
        // Models in another order are the same models.
        let beat = signed(1, 2, &["b", "a"]);
        assert!(store.heartbeat(&beat).await.expect("beat"));
        let got = store.get("node-1", NOW).await.expect("get").expect("there");
        assert_eq!(got.signed.record.seq, 2);
        assert_eq!(
            got.signed.signature, beat.signature,
            "the heartbeat's signature is stored"
        );
        assert!(!store
            .heartbeat(&signed(1, 2, &["a", "b"]))
            .await
            .expect("replay"));
        assert!(!store
            .heartbeat(&signed(1, 3, &["a"]))
            .await
            .expect("models changed"));
        let mut moved = signed(1, 3, &["a", "b"]);
        moved.record.endpoint = "127.0.0.9:7443".into();
        assert!(!store.heartbeat(&moved).await.expect("endpoint changed"));
        let mut renamed = signed(1, 3, &["a", "b"]);
        renamed.record.node_id = "node-x".into();
        assert!(!store.heartbeat(&renamed).await.expect("node id changed"));
        store
            .put(&signed(2, 1, &["a"]), false, None)
            .await
            .expect("unreached");
        assert!(!store
            .heartbeat(&signed(2, 2, &["a"]))
            .await
            .expect("not reached"));
        let key = signed(1, 1, &[]).record.public_key;
        assert!(store.delete(&key, 10, NOW + 300).await.expect("delete"));
        assert!(!store
            .heartbeat(&signed(1, 11, &["a", "b"]))
            .await
            .expect("deleted"));
    }

    #[tokio::test]
    async fn a_batch_of_heartbeats_is_one_statement_with_an_answer_for_each() {
        let (_dir, store) = sqlite().await;
        for n in 1..=4u8 {
            store
                .put(&signed(n, 1, &["a"]), true, None)
                .await
                .expect("put");
        }
        let beat = |n: u8, seq: u64| Write::Heartbeat {
            signed: signed(n, seq, &["a"]),
            models: "a".into(),
        };
        let writes = [
            beat(1, 2),
            beat(2, 2),
            // Key 1 again in the same batch: a second statement, after the first applied.
            beat(1, 3),
            // A replay, and a key nobody stored.
            beat(3, 1),
            beat(9, 2),
            // A put in between goes after the batch's heartbeats: key 4's heartbeat applies
            // first, then the put's higher seq replaces it.
            Write::Put {
                signed: signed(4, 5, &["b"]),
                models: "b".into(),
                reachable: true,
                index_models: true,
            },
            beat(4, 2),
        ];
        let done = in_one_transaction(&store.pool, writes.iter())
            .await
            .expect("batch");
        assert_eq!(
            done,
            [
                Done::Heartbeat(true),
                Done::Heartbeat(true),
                Done::Heartbeat(true),
                Done::Heartbeat(false),
                Done::Heartbeat(false),
                Done::Put(PutOutcome::Stored),
                Done::Heartbeat(true),
            ]
        );
        let seq = |id: &'static str| {
            let store = store.clone();
            async move {
                store
                    .get(id, NOW)
                    .await
                    .expect("get")
                    .map(|l| l.signed.record.seq)
            }
        };
        assert_eq!(seq("node-1").await, Some(3));
        assert_eq!(seq("node-2").await, Some(2));
        assert_eq!(seq("node-3").await, Some(1));
        assert_eq!(seq("node-9").await, None);
        assert_eq!(seq("node-4").await, Some(5));
    }

    #[tokio::test]
    async fn a_stale_delete_leaves_the_live_records_model_index() {
        let (_dir, store) = sqlite().await;
        store
            .put(&signed(1, 9, &["a"]), true, None)
            .await
            .expect("put");
        let key = signed(1, 1, &[]).record.public_key;
        assert!(!store.delete(&key, 8, NOW + 300).await.expect("stale"));
        assert_eq!(store.by_model("a", "", 10, NOW).await.expect("a").len(), 1);
    }

    #[tokio::test]
    async fn heartbeats_with_the_same_models_keep_the_model_index() {
        let (_dir, store) = sqlite().await;
        store
            .put(&signed(1, 1, &["a", "b"]), true, None)
            .await
            .expect("put");
        let (stored, _) = store
            .binding(&signed(1, 1, &[]).record.public_key, "node-1")
            .await
            .expect("b");
        let models = stored.map(|s| s.models).expect("stored");
        assert_eq!(models, "a,b");
        let beat = signed(1, 2, &["b", "a"]);
        assert_eq!(
            store.put(&beat, true, Some(&models)).await.expect("beat"),
            PutOutcome::Stored
        );
        assert_eq!(
            store.put(&beat, true, Some(&models)).await.expect("again"),
            PutOutcome::Replay
        );
        assert_eq!(
            store.by_model("a", "", 10, NOW).await.expect("a")[0]
                .signed
                .record
                .seq,
            2
        );
        let moved = signed(1, 3, &["c"]);
        store
            .put(&moved, true, Some(&models))
            .await
            .expect("changed");
        assert!(store
            .by_model("a", "", 10, NOW)
            .await
            .expect("a")
            .is_empty());
        assert_eq!(store.by_model("c", "", 10, NOW).await.expect("c").len(), 1);
    }
}
