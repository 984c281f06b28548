//! Spot checks: a few small key ranges per table, hashed the way verification hashes them, for
//! hypercare checkpoints — where the application keeps writing and a full comparison would
//! never see both sides at one instant, but a hundred rows can be compared between two looks.

use tokio_postgres::Client;

use super::sql::Range;
use super::{Plan, Side, TableName, VerifyError, catalog, key_texts, plan, query_with, session};

/// The tables that can be spot-checked: those with a primary key whose columns both sides have.
pub struct SpotTables {
    plans: Vec<Plan>,
}

/// Rows `[lower, upper)` of one table (`upper` open at the end of the table).
#[derive(Clone, Debug)]
pub struct Spot {
    table: usize,
    range: Range,
    /// `schema.table from key=value`, for people.
    pub description: String,
}

impl Spot {
    /// The table.
    pub fn table<'a>(&self, tables: &'a SpotTables) -> &'a TableName {
        &tables.plans[self.table].name
    }
}

/// A spot's rows on one side: their count and the exact sum of their row hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpotHash {
    /// Rows in the range.
    pub rows: i64,
    /// Sum of the rows' hashes (exact, as text).
    pub sum: String,
}

impl SpotTables {
    /// Reads both catalogs and keeps `tables` (or every table when empty) that have a usable
    /// key. Both clients are put into the verifier's canonical session settings.
    pub async fn read(
        source: &Client,
        target: &Client,
        tables: &[TableName],
    ) -> Result<Self, VerifyError> {
        session::canonicalize(source, Side::Source).await?;
        session::canonicalize(target, Side::Target).await?;
        let s = catalog::read(source)
            .await
            .map_err(super::catalog_error(Side::Source))?;
        let t = catalog::read(target)
            .await
            .map_err(super::catalog_error(Side::Target))?;
        let plans = s
            .tables
            .iter()
            .filter(|(name, _)| tables.is_empty() || tables.contains(name))
            .filter_map(|(name, table)| {
                Some(plan(
                    name,
                    table,
                    t.tables.get(name)?,
                    s.encoding != t.encoding,
                ))
            })
            .filter(|p| p.key.is_some())
            .collect();
        Ok(Self { plans })
    }

    /// The tables that will be checked.
    pub fn tables(&self) -> impl Iterator<Item = &TableName> {
        self.plans.iter().map(|p| &p.name)
    }

    /// Picks up to `per_table` spots of `rows` rows in each table, starting at keys drawn at
    /// random from a block sample of `client`'s copy.
    pub async fn pick(
        &self,
        client: &Client,
        side: Side,
        per_table: i64,
        rows: i64,
    ) -> Result<Vec<Spot>, VerifyError> {
        let mut spots = Vec::new();
        for (t, plan) in self.plans.iter().enumerate() {
            let err = |source| VerifyError::Hash {
                side,
                table: plan.name.clone(),
                source,
            };
            // A block sample of about twenty rows per wanted spot (the whole of a small or
            // never analysed table).
            let percent = if plan.estimated_rows > 0.0 {
                (100.0 * 20.0 * per_table as f64 / plan.estimated_rows).clamp(0.001, 100.0)
            } else {
                100.0
            };
            let starts = client
                .query(&plan.sql.spot_starts(), &[&percent, &per_table])
                .await
                .map_err(err)?;
            for start in starts.iter().map(key_texts) {
                let (sql, params) = plan.sql.spot_end(&start);
                let end = query_with(client, &sql, &params, Some(rows))
                    .await
                    .map_err(err)?;
                let key = plan.key.as_deref().unwrap_or_default();
                let at: Vec<String> = key
                    .iter()
                    .zip(&start)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                spots.push(Spot {
                    table: t,
                    description: format!("{} from {}", plan.name, at.join(",")),
                    range: Range {
                        lower: Some(start),
                        upper: end.first().map(key_texts),
                    },
                });
            }
        }
        Ok(spots)
    }

    /// The spot's rows on `client`: count and hash sum.
    pub async fn hash(
        &self,
        client: &Client,
        side: Side,
        spot: &Spot,
    ) -> Result<SpotHash, VerifyError> {
        let plan = &self.plans[spot.table];
        let (sql, params) = plan.sql.chunk_hash(&spot.range);
        let rows = query_with(client, &sql, &params, None)
            .await
            .map_err(|source| VerifyError::Hash {
                side,
                table: plan.name.clone(),
                source,
            })?;
        Ok(SpotHash {
            rows: rows[0].get(0),
            sum: rows[0].get(1),
        })
    }
}
