//! The installable SQL, embedded: `relay migrate` runs exactly what `psql -f sql/install.sql` runs.

use thiserror::Error;
use tokio_postgres::GenericClient;

/// `sql/install.sql`, byte for byte.
pub const INSTALL_SQL: &str = include_str!("../../sql/install.sql");
/// `sql/uninstall.sql`, byte for byte.
pub const UNINSTALL_SQL: &str = include_str!("../../sql/uninstall.sql");
/// The VCS preset's reference tables (`sql/vcs/tables.sql`).
pub const VCS_TABLES_SQL: &str = include_str!("../../sql/vcs/tables.sql");
/// The VCS preset's event declarations (`sql/vcs/events.sql`); call `provisioning.vcs_declare()` after.
pub const VCS_EVENTS_SQL: &str = include_str!("../../sql/vcs/events.sql");

/// The schema version this binary understands.
pub const SCHEMA_VERSION: i32 = 1;

#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("the provisioning schema is not installed in this database; run `relay migrate` or `psql -v ON_ERROR_STOP=1 -f sql/install.sql`")]
    NotInstalled,
    #[error("the provisioning schema is at version {found}, this relay needs version {expected}; run `relay migrate` (or psql -f sql/install.sql) to upgrade it")]
    TooOld { found: i32, expected: i32 },
    #[error("the provisioning schema is at version {found}, newer than this relay understands ({expected}); upgrade the relay binary")]
    TooNew { found: i32, expected: i32 },
    #[error("applying the schema failed: {0}")]
    Apply(#[source] tokio_postgres::Error),
    #[error("reading the schema version failed: {0}")]
    Query(#[source] tokio_postgres::Error),
}

/// Apply `sql/install.sql` (idempotent, serialised by an advisory lock inside the SQL).
pub async fn migrate(client: &impl GenericClient) -> Result<(), SchemaError> {
    client
        .batch_execute(INSTALL_SQL)
        .await
        .map_err(SchemaError::Apply)
}

/// Install the VCS preset tables and declare its events with default names.
pub async fn install_vcs_preset(client: &impl GenericClient) -> Result<(), SchemaError> {
    let sql = format!("BEGIN;\nSET LOCAL client_min_messages = warning;\nSELECT pg_advisory_xact_lock(7291850211);\n{VCS_TABLES_SQL}\n{VCS_EVENTS_SQL}\nSELECT provisioning.vcs_declare();\nCOMMIT;");
    client.batch_execute(&sql).await.map_err(SchemaError::Apply)
}

/// The installed schema version, or None when the schema is absent.
pub async fn installed_version(client: &impl GenericClient) -> Result<Option<i32>, SchemaError> {
    let row = client
        .query_one(
            "SELECT to_regclass('provisioning.schema_version') IS NOT NULL",
            &[],
        )
        .await
        .map_err(SchemaError::Query)?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_one("SELECT max(version) FROM provisioning.schema_version", &[])
        .await
        .map_err(SchemaError::Query)?;
    Ok(row.get::<_, Option<i32>>(0))
}

/// Refuse to run against a schema this binary does not understand, saying what to run.
pub async fn check_version(client: &impl GenericClient) -> Result<(), SchemaError> {
    match installed_version(client).await? {
        None => Err(SchemaError::NotInstalled),
        Some(v) if v < SCHEMA_VERSION => Err(SchemaError::TooOld {
            found: v,
            expected: SCHEMA_VERSION,
        }),
        Some(v) if v > SCHEMA_VERSION => Err(SchemaError::TooNew {
            found: v,
            expected: SCHEMA_VERSION,
        }),
        Some(_) => Ok(()),
    }
}
