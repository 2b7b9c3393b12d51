//! Capture from the team's own tables: one statement-level trigger per source
//! and operation writes the matching rows into `wardcall.outbox` in the same
//! transaction as the team's write, then sends one empty `NOTIFY wardcall_outbox`
//! per statement (never per row; never a payload, so NOTIFY's 8000-byte limit
//! cannot be reached). A rolled-back write leaves no outbox row.
//!
//! Triggers use transition tables (PostgreSQL manual, CREATE TRIGGER,
//! "REFERENCING { OLD | NEW } TABLE"), aliased `new` and `old` inside the trigger
//! so that a source's condition is written over `NEW.column` / `OLD.column` as
//! in a row trigger. For UPDATE, old and new rows are paired on the table's
//! primary key; a row whose primary key itself changed is captured with `OLD`
//! all NULL.
//!
//! Before a trigger is installed its condition and payload are checked against
//! the real table: a wrong condition fails `wardcall migrate`/`serve` with the
//! source's name, never the team's own INSERTs.

use crate::config::{split_table_name, Config, ConfigError, Operation, Source};
use crate::db::migrate::SCHEMA_LOCK_KEY;
use crate::store::audit;
use anyhow::{bail, Context};
use sqlx::{PgPool, Postgres, Transaction};

/// Channel the capture triggers and `wardcall.emit` notify (empty payload).
pub const OUTBOX_CHANNEL: &str = "wardcall_outbox";

/// What [`install_sources`] did with sources installed earlier but absent
/// from this config.
#[derive(Debug, Clone, Default)]
pub struct SourcesReport {
    /// Sources of this config whose triggers are installed.
    pub installed: Vec<String>,
    /// Sources absent from this config whose triggers were removed (`--prune`).
    pub removed: Vec<String>,
    /// Sources absent from this config whose triggers were kept (no `--prune`).
    pub kept: Vec<String>,
}

/// Installs (or replaces) the trigger of every source. Idempotent; one
/// transaction under the schema advisory lock, so concurrent engines do not race.
///
/// Errors: a table that does not exist, an UPDATE source on a table without a
/// primary key, or a condition/payload that PostgreSQL rejects — each naming
/// the source.
///
/// Triggers of sources absent from `sources` (installed by another config)
/// are removed only when `prune` is true (`--prune`), each logged and audited
/// `source.removed`; otherwise they are kept and named in a warning, so that
/// running `migrate`/`serve` with the wrong config never silently stops capture.
pub async fn install_sources(pool: &PgPool, sources: &[Source], prune: bool, actor: &str) -> anyhow::Result<SourcesReport> {
    let mut report = SourcesReport { installed: sources.iter().map(|s| s.name.clone()).collect(), ..Default::default() };
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(SCHEMA_LOCK_KEY).execute(&mut *tx).await?;
    for source in sources {
        install_one(&mut tx, source, actor).await.with_context(|| format!("source '{}'", source.name))?;
    }
    let installed = crate::store::sources::all(&mut tx).await?;
    for (name, table, triggers, function) in installed {
        if sources.iter().any(|s| s.name == name) {
            continue;
        }
        if !prune {
            report.kept.push(name);
            continue;
        }
        remove_triggers(&mut tx, &table, &triggers, &function).await?;
        crate::store::sources::remove(&mut tx, &name).await?;
        audit::record(&mut tx, audit::Entity::Source, &name, "source.removed", None, None, actor, serde_json::json!({"table": table})).await?;
        tracing::info!(source = %name, table = %table, "removed the capture trigger of a source not in this config (--prune)");
        report.removed.push(name);
    }
    tx.commit().await?;
    if !report.kept.is_empty() {
        tracing::warn!(
            sources = %report.kept.join(", "),
            "capture triggers of sources not in this config are left installed (their rows still reach the outbox); pass --prune to remove them"
        );
    }
    Ok(report)
}

/// Checks the config against the real database before anything is installed
/// (called by [`crate::app::prepare_database`] after wardcall's migrations):
///
/// - the server's `synchronous_commit` is not `off` (a warning when it is
///   `local` while synchronous standbys are configured);
/// - `engine.pool_size` plus `engine.webhook_pool_size`,
///   `engine.team_read_pool_size` and the listener's connection fits the server's
///   `max_connections` minus `superuser_reserved_connections` and
///   `reserved_connections` (PostgreSQL manual, 19.3.1 "Connection Settings");
/// - every source's table exists, and its condition and payload are valid
///   over `NEW`/`OLD` of that table;
/// - every escalation lookup is a statement taking at most `$1 jsonb` and
///   returning exactly one text column;
/// - every `write_back` hook is a statement taking at most `$1 jsonb, $2 jsonb`;
/// - every tier's `recipients` query takes at most `$1 jsonb, $2 jsonb` and
///   returns the columns `id`, `name`, `voice`, `sms` of a text type
///   ([`crate::notify::recipients::check_query`]).
///
/// Each SQL text is only parsed and described (the extended protocol's
/// Parse/Describe, PostgreSQL manual 55.2.3 "Extended Query") on a dedicated
/// connection inside a transaction that is rolled back: no statement runs.
///
/// Errors: a [`ConfigError`] naming the config file, the key (e.g.
/// `workflows[0].lookups.room_name`) and PostgreSQL's reason (no values: the
/// statement is never executed).
pub async fn check_config_against_database(db: &crate::db::Database, config: &Config) -> anyhow::Result<()> {
    use sqlx::{ConnectOptions, Executor, Statement, TypeInfo};
    let file = config.file_name();
    let fail = |key: String, problem: String| ConfigError { file: file.to_string(), key, problem };
    let mut conn = db.connect_options.connect().await.context("connecting to check the config against the database")?;
    let result = async {
        let mut tx = sqlx::Connection::begin(&mut conn).await?;
        sqlx::raw_sql("SET LOCAL statement_timeout = '10s'; SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
        let (max, reserved): (i32, i32) = sqlx::query_as(
            "SELECT current_setting('max_connections')::int,
                    current_setting('superuser_reserved_connections')::int
                    + coalesce(nullif(current_setting('reserved_connections', true), ''), '0')::int",
        )
        .fetch_one(&mut *tx)
        .await?;
        let usable = (max - reserved).max(0) as i64;
        let wanted = config.engine.pool_size as i64 + config.engine.webhook_pool_size as i64 + config.engine.team_read_pool_size as i64 + 1;
        if wanted > usable {
            return Err(fail(
                "engine.pool_size".into(),
                format!(
                    "{} connections, plus engine.webhook_pool_size {}, engine.team_read_pool_size {} and one for the listener, exceed what the server allows: max_connections {max} leaves {usable} for clients",
                    config.engine.pool_size, config.engine.webhook_pool_size, config.engine.team_read_pool_size
                ),
            )
            .into());
        }
        // Intents must be on disk before their sends (DESIGN.md invariant
        // 2), and the dispatch's asynchronous commit relies on the next
        // commit waiting for the WAL (PostgreSQL manual 19.5.1, 30.4).
        let (synchronous_commit, standbys): (String, String) =
            sqlx::query_as("SELECT current_setting('synchronous_commit'), current_setting('synchronous_standby_names')").fetch_one(&mut *tx).await?;
        if synchronous_commit == "off" {
            return Err(fail(
                "synchronous_commit (a setting of the server, of the database or of wardcall's role)".into(),
                "is off: a call's intent would count as committed before it is on disk, and a crash could forget a call already placed; set it to on (ALTER ROLE … SET synchronous_commit = on, or in postgresql.conf)".into(),
            )
            .into());
        }
        if synchronous_commit == "local" && !standbys.trim().is_empty() {
            tracing::warn!(
                "synchronous_commit is local while synchronous standbys are configured: wardcall's commits do not wait for a standby, and a failover can lose a call's intent"
            );
        }
        let jsonb = <sqlx::types::JsonValue as sqlx::Type<Postgres>>::type_info();
        for (i, source) in config.sources.iter().enumerate() {
            let key = |k: &str| format!("sources[{i}].{k} (source '{}')", source.name);
            let (schema, table) = split_table_name(&source.table).expect("validated at config load");
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
            let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text").bind(&qualified).fetch_one(&mut *tx).await?;
            if exists.is_none() {
                return Err(fail(key("table"), format!("table {schema}.{table} does not exist")).into());
            }
            let from = format!("FROM {qualified} AS new LEFT JOIN {qualified} AS old ON false");
            let checks = [
                ("condition", source.condition.as_deref().map(|c| format!("SELECT 1 {from} WHERE ({c})"))),
                ("payload", source.payload.as_deref().map(|p| format!("SELECT ({p})::jsonb {from}"))),
            ];
            for (what, sql) in checks {
                let Some(sql) = sql else { continue };
                if let Err(e) = (&mut *tx).prepare(&sql).await {
                    return Err(fail(key(what), format!("PostgreSQL refused it over NEW/OLD of {schema}.{table}: {}", db_message(&e))).into());
                }
            }
        }
        for (i, w) in config.workflows.iter().enumerate() {
            if let Some(when) = &w.when {
                let key = format!("workflows[{i}].when");
                let sql = format!("SELECT 1 FROM (SELECT $1::jsonb AS payload) AS event WHERE ({when})");
                if let Err(e) = (&mut *tx).prepare_with(&sql, std::slice::from_ref(&jsonb)).await {
                    return Err(fail(key, format!("PostgreSQL refused it as a boolean over payload (jsonb): {}", db_message(&e))).into());
                }
            }
            for (phase, j, step) in w.all_steps() {
                let step_key = w.step_key(i, phase, j);
                let team_sql: Vec<(String, String)> = match step.kind() {
                    Ok(crate::workflows::model::StepKind::Sql(sql)) => {
                        let text = if step.keep.is_some() { crate::workflows::team_sql::wrap_for_keep(sql) } else { sql.to_string() };
                        vec![(format!("{step_key}.sql"), text)]
                    }
                    Ok(crate::workflows::model::StepKind::SleepUntil(crate::workflows::model::InstantSpec::Sql { sql })) => {
                        vec![(format!("{step_key}.sleep_until.sql"), crate::workflows::team_sql::wrap_for_instant(sql))]
                    }
                    _ => Vec::new(),
                };
                for (key, sql) in team_sql {
                    let types = vec![jsonb.clone(); crate::workflows::model::sql_parameter_count(&sql).min(2)];
                    if let Err(e) = (&mut *tx).prepare_with(&sql, &types).await {
                        let hint = if step.keep.is_some() { " (a step that keeps its row must return rows: a SELECT, or RETURNING)" } else { "" };
                        return Err(fail(key, format!("PostgreSQL refused it: {}{hint}", db_message(&e))).into());
                    }
                }
                if let Some(sql) = step.notify.as_ref().and_then(|n| n.recipients.as_deref()) {
                    if let Err(problem) = crate::notify::recipients::check_query(&mut tx, sql).await {
                        return Err(fail(format!("{step_key}.notify.recipients"), problem).into());
                    }
                }
                let Some(esc) = step.escalate.as_deref() else { continue };
                let prefix = if w.kind == crate::config::WorkflowKind::Escalation { step_key.clone() } else { format!("{step_key}.escalate") };
                let mut lookups: Vec<(&String, &String)> = esc.lookups.iter().collect();
                lookups.sort();
                for (name, sql) in lookups {
                    let key = format!("{prefix}.lookups.{name}");
                    let statement = match (&mut *tx).prepare_with(sql, std::slice::from_ref(&jsonb)).await {
                        Ok(s) => s,
                        Err(e) => return Err(fail(key, format!("PostgreSQL refused it: {}", db_message(&e))).into()),
                    };
                    check_parameters(statement.parameters(), 1).map_err(|p| fail(key.clone(), p))?;
                    let columns = statement.columns();
                    if columns.len() != 1 {
                        return Err(fail(key, format!("must return exactly one text column; it returns {}", columns.len())).into());
                    }
                    let ty = sqlx::Column::type_info(&columns[0]);
                    if !<String as sqlx::Type<Postgres>>::compatible(ty) {
                        return Err(fail(key, format!("must return one text column; its column is of type {} (cast it with ::text)", ty.name())).into());
                    }
                }
                for (hook, sql) in esc.write_back.hooks() {
                    let Some(sql) = sql else { continue };
                    let key = format!("{prefix}.write_back.{hook}");
                    let statement = match (&mut *tx).prepare_with(sql, &[jsonb.clone(), jsonb.clone()]).await {
                        Ok(s) => s,
                        Err(e) => return Err(fail(key, format!("PostgreSQL refused it: {}", db_message(&e))).into()),
                    };
                    check_parameters(statement.parameters(), 2).map_err(|p| fail(key, p))?;
                }
            }
        }
        for (i, p) in config.policies.iter().enumerate() {
            for (j, step) in p.steps.iter().enumerate() {
                let Some(sql) = step.who.recipients.as_deref() else { continue };
                if let Err(problem) = crate::notify::recipients::check_query(&mut tx, sql).await {
                    return Err(fail(format!("policies[{i}].steps[{j}].recipients"), problem).into());
                }
            }
        }
        tx.rollback().await?;
        anyhow::Ok(())
    }
    .await;
    let _ = sqlx::Connection::close(conn).await;
    result
}

/// At most `allowed` parameters (`$1` payload, `$2` details): a statement with
/// more would fail at every run with a bind error.
fn check_parameters(parameters: Option<sqlx::Either<&[sqlx::postgres::PgTypeInfo], usize>>, allowed: usize) -> Result<(), String> {
    let n = match parameters {
        Some(sqlx::Either::Left(types)) => types.len(),
        Some(sqlx::Either::Right(n)) => n,
        None => 0,
    };
    if n > allowed {
        let names = if allowed == 1 { "$1 (the event payload, jsonb)" } else { "$1 (the event payload) and $2 (the details), both jsonb" };
        return Err(format!("uses ${n}, but only {names} are bound"));
    }
    Ok(())
}

async fn remove_triggers(tx: &mut Transaction<'_, Postgres>, table: &str, triggers: &[String], function: &str) -> anyhow::Result<()> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text").bind(table).fetch_one(&mut **tx).await?;
    if exists.is_some() {
        for t in triggers {
            sqlx::raw_sql(&format!("DROP TRIGGER IF EXISTS {} ON {}", quote_ident(t), table)).execute(&mut **tx).await?;
        }
    }
    sqlx::raw_sql(&format!("DROP FUNCTION IF EXISTS {}()", function)).execute(&mut **tx).await?;
    Ok(())
}

async fn install_one(tx: &mut Transaction<'_, Postgres>, source: &Source, actor: &str) -> anyhow::Result<()> {
    let (schema, table) = split_table_name(&source.table).expect("validated at config load");
    let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text").bind(&qualified).fetch_one(&mut **tx).await?;
    if exists.is_none() {
        bail!("table {schema}.{table} does not exist");
    }
    let condition = source.condition.clone().unwrap_or_else(|| "true".into());
    let payload = source.payload.clone().unwrap_or_else(|| "to_jsonb(NEW)".into());
    for (what, text) in [("condition", &condition), ("payload", &payload)] {
        if text.contains("$wardcall$") || text.contains(';') {
            bail!("{what} may not contain ';' or '$wardcall$'");
        }
    }
    let wants_update = source.operations.contains(&Operation::Update);
    let pk_columns: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
          WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY a.attnum",
    )
    .bind(&qualified)
    .fetch_all(&mut **tx)
    .await?;
    if wants_update && pk_columns.is_empty() {
        bail!("UPDATE capture needs a primary key on {schema}.{table} to pair old and new rows");
    }
    // Check the condition and payload against the real table, with NEW and OLD
    // bound as they will be in the trigger. LIMIT 0: nothing is read.
    let check = format!("SELECT ({payload})::jsonb FROM {qualified} AS new LEFT JOIN {qualified} AS old ON false WHERE ({condition}) LIMIT 0");
    let mut sp = sqlx::Connection::begin(&mut **tx).await?;
    if let Err(e) = sqlx::raw_sql(&check).execute(&mut *sp).await {
        bail!("condition or payload is not valid SQL over NEW/OLD of {schema}.{table}: {}", db_message(&e));
    }
    sp.rollback().await?;

    let function = format!("wardcall.{}", quote_ident(&format!("capture_{}", source.name)));
    let pk_join = if pk_columns.is_empty() {
        "false".to_string()
    } else {
        pk_columns.iter().map(|c| format!("new.{0} = old.{0}", quote_ident(c))).collect::<Vec<_>>().join(" AND ")
    };
    let body = format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $wardcall$
#variable_conflict use_column
BEGIN
    -- wardcall's own write-backs never re-trigger a page: rows written while
    -- a write-back statement runs (by it or by the triggers it fires) are
    -- skipped. The setting is off again before anything else runs, the
    -- commit's deferred triggers included, whose rows are captured.
    IF coalesce(current_setting('wardcall.write_back', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO wardcall.outbox (source, event, payload)
        SELECT {src}, {event}, ({payload})::jsonb
          FROM wardcall_new_rows AS new
          LEFT JOIN (SELECT * FROM wardcall_new_rows LIMIT 0) AS old ON false
         WHERE ({condition});
    ELSE
        INSERT INTO wardcall.outbox (source, event, payload)
        SELECT {src}, {event}, ({payload})::jsonb
          FROM wardcall_new_rows AS new
          LEFT JOIN wardcall_old_rows AS old ON ({pk_join})
         WHERE ({condition});
    END IF;
    IF FOUND THEN
        PERFORM pg_notify('{OUTBOX_CHANNEL}', '');
    END IF;
    RETURN NULL;
END $wardcall$",
        src = quote_literal(&source.name),
        event = quote_literal(&source.event),
    );
    sqlx::raw_sql(&body).execute(&mut **tx).await.map_err(|e| anyhow::anyhow!("installing the trigger function failed: {}", db_message(&e)))?;

    let mut triggers = Vec::new();
    for op in [Operation::Insert, Operation::Update] {
        let (suffix, referencing) = match op {
            Operation::Insert => ("insert", "REFERENCING NEW TABLE AS wardcall_new_rows"),
            Operation::Update => ("update", "REFERENCING NEW TABLE AS wardcall_new_rows OLD TABLE AS wardcall_old_rows"),
        };
        let trigger = format!("wardcall_capture_{}_{}", source.name, suffix);
        sqlx::raw_sql(&format!("DROP TRIGGER IF EXISTS {} ON {qualified}", quote_ident(&trigger))).execute(&mut **tx).await?;
        if source.operations.contains(&op) {
            sqlx::raw_sql(&format!(
                "CREATE TRIGGER {} AFTER {} ON {qualified} {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {function}()",
                quote_ident(&trigger),
                suffix.to_uppercase()
            ))
            .execute(&mut **tx)
            .await?;
            triggers.push(trigger);
        }
    }
    // A source that moved to another table: drop its old triggers there.
    let previous = crate::store::sources::table_and_triggers(tx, &source.name).await?;
    if let Some((old_table, old_triggers)) = previous {
        if old_table != qualified {
            let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text").bind(&old_table).fetch_one(&mut **tx).await?;
            if exists.is_some() {
                for t in old_triggers {
                    sqlx::raw_sql(&format!("DROP TRIGGER IF EXISTS {} ON {}", quote_ident(&t), old_table)).execute(&mut **tx).await?;
                }
            }
        }
    }
    let changed = crate::store::sources::upsert(tx, &source.name, &qualified, &triggers, &function).await?;
    if changed {
        audit::record(
            tx,
            audit::Entity::Source,
            &source.name,
            "source.installed",
            None,
            None,
            actor,
            serde_json::json!({"table": qualified, "triggers": triggers, "event": source.event}),
        )
        .await?;
    }
    Ok(())
}

/// A log- and audit-safe description of a sqlx error: never the values a
/// statement carried or rejected (patient data), always enough to find the cause.
///
/// For an error returned by PostgreSQL the text is
/// `SQLSTATE <code> (<condition name>)` followed, when the server reported them,
/// by `constraint <name>`, `table <schema.table>`, `column <name>`,
/// `data type <name>`: schema identifiers from the error's
/// fields, never its message, DETAIL, HINT, WHERE or QUERY, which quote values
/// (`Key (patient_id)=(…) is not present`, `invalid input syntax for type uuid:
/// "…"`, `Failing row contains (…)`). Example:
/// `SQLSTATE 23503 (foreign_key_violation), constraint alerts_patient_id_fkey, table public.alerts`.
/// Codes and names: PostgreSQL 15 manual, Appendix A "PostgreSQL Error Codes";
/// fields: §55.8 "Error and Notice Message Fields".
///
/// Exception: errors of the classes in [`MESSAGE_SAFE_CLASSES`] also carry the
/// server's message. Those of class 42 ("syntax error or access rule violation")
/// and 3F ("invalid schema name"), e.g. `column "nme" does not exist`, are raised
/// while PostgreSQL parses and analyses a statement, before any row is read, so
/// the message quotes the SQL text (wardcall's or the config's, never a row) and
/// is what an operator needs to fix a config. Those of classes 08 (connection),
/// 28 (authorization), 3D (unknown database), 40 (serialization failure,
/// deadlock), 53 (insufficient resources) and 57 (operator intervention, e.g.
/// `the database system is starting up`, a statement timeout) describe the
/// server's or the connection's state, never a row (their DETAIL, which can
/// name rows, is still not shown).
///
/// Other sqlx errors (I/O, pool, protocol) are described by sqlx's text, except
/// decoding errors, whose source may quote the value that failed to decode.
pub fn db_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
            let mut out = if code.is_empty() { "database error without SQLSTATE".to_string() } else { format!("SQLSTATE {code} ({})", sqlstate_name(&code)) };
            let pg = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
            let mut field = |label: &str, value: Option<&str>| {
                if let Some(v) = value.filter(|v| !v.is_empty()) {
                    out.push_str(&format!(", {label} {v}"));
                }
            };
            field("constraint", d.constraint());
            match (pg.and_then(|p| p.schema()), d.table()) {
                (Some(schema), Some(table)) => field("table", Some(&format!("{schema}.{table}"))),
                (None, table) => field("table", table),
                (Some(schema), None) => field("schema", Some(schema)),
            }
            if let Some(pg) = pg {
                field("column", pg.column());
                field("data type", pg.data_type());
            }
            if MESSAGE_SAFE_CLASSES.iter().any(|class| code.starts_with(class)) {
                out.push_str(&format!(": {}", d.message()));
            }
            out
        }
        sqlx::Error::ColumnDecode { index, .. } => {
            format!("cannot decode result column {index} (the value and the decoder's message are not shown)")
        }
        sqlx::Error::Decode(_) => "cannot decode a value returned by the database (not shown)".to_string(),
        other => other.to_string(),
    }
}

/// SQLSTATE classes whose primary message [`db_message`] shows (Appendix A of the
/// PostgreSQL 15 manual): they never quote a row's values.
pub const MESSAGE_SAFE_CLASSES: [&str; 8] = ["08", "28", "3D", "3F", "40", "42", "53", "57"];

/// [`db_message`] for every error in an `anyhow` chain: the chain's texts joined
/// with `": "` (as `{:#}` prints them), with each [`sqlx::Error`] replaced by its
/// redacted form and the context texts above it kept. Use it wherever an error
/// that may come from the database is logged, audited or stored.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        if let Some(db) = cause.downcast_ref::<sqlx::Error>() {
            parts.push(db_message(db));
            // sqlx's own sources (the server's message) are not shown.
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// Condition name of a SQLSTATE (Appendix A of the PostgreSQL 15 manual) for the
/// codes wardcall's statements and write-backs meet; otherwise the name of its class.
fn sqlstate_name(code: &str) -> &'static str {
    match code {
        "08000" => "connection_exception",
        "08003" => "connection_does_not_exist",
        "08006" => "connection_failure",
        "0A000" => "feature_not_supported",
        "21000" => "cardinality_violation",
        "22001" => "string_data_right_truncation",
        "22003" => "numeric_value_out_of_range",
        "22004" => "null_value_not_allowed",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22012" => "division_by_zero",
        "22021" => "character_not_in_repertoire",
        "22023" => "invalid_parameter_value",
        "22P02" => "invalid_text_representation",
        "22P05" => "untranslatable_character",
        "23000" => "integrity_constraint_violation",
        "23502" => "not_null_violation",
        "23503" => "foreign_key_violation",
        "23505" => "unique_violation",
        "23514" => "check_violation",
        "23P01" => "exclusion_violation",
        "25P02" => "in_failed_sql_transaction",
        "28000" => "invalid_authorization_specification",
        "28P01" => "invalid_password",
        "3D000" => "invalid_catalog_name",
        "3F000" => "invalid_schema_name",
        "40001" => "serialization_failure",
        "40P01" => "deadlock_detected",
        "42501" => "insufficient_privilege",
        "42601" => "syntax_error",
        "42703" => "undefined_column",
        "42804" => "datatype_mismatch",
        "42883" => "undefined_function",
        "42P01" => "undefined_table",
        "42P18" => "indeterminate_datatype",
        "53300" => "too_many_connections",
        "55P03" => "lock_not_available",
        "57014" => "query_canceled",
        "57P01" => "admin_shutdown",
        "P0001" => "raise_exception",
        _ => match code.get(..2).unwrap_or("") {
            "08" => "connection exception",
            "0A" => "feature not supported",
            "22" => "data exception",
            "23" => "integrity constraint violation",
            "25" => "invalid transaction state",
            "28" => "invalid authorization specification",
            "40" => "transaction rollback",
            "42" => "syntax error or access rule violation",
            "53" => "insufficient resources",
            "54" => "program limit exceeded",
            "55" => "object not in prerequisite state",
            "57" => "operator intervention",
            "58" => "system error",
            "P0" => "PL/pgSQL error",
            "XX" => "internal error",
            _ => "other error",
        },
    }
}

/// Quotes an SQL identifier (PostgreSQL manual 4.1.1): always double-quoted,
/// embedded quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal (PostgreSQL manual 4.1.2.1): single quotes doubled.
/// With `standard_conforming_strings` on (the default since 9.1) backslashes are literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
