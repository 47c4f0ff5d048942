//! The consistency rule the fencing argument needs, enforced at start-up.
//!
//! An owner acknowledges a message only after a read-back of the claims
//! finds its own claim still the latest, and a new owner's claim is written
//! before it reads the transcript. Both steps are sound only if every read
//! shares at least one replica with every earlier write: R + W > RF, counted
//! where the replicas are. With several data centres the `LOCAL_*` levels
//! count only in the data centre the operation came from, and a chat's
//! owner and its next owner may sit in different ones, so every pair of
//! data centres must overlap: `QUORUM` for both, or `EACH_QUORUM` writes
//! with `LOCAL_QUORUM` reads. `LOCAL_QUORUM` for both is safe only in a
//! single data centre.
//!
//! The keyspace's replication is read from `system_schema.keyspaces`;
//! levels that break the rule stop the instance unless
//! `cassandra.unsafe-consistency = true`, which is logged as an error.

use crate::config::{CassandraConfig, Consistency as Level};
use scylla::client::session::Session;
use std::collections::{BTreeMap, HashMap};

/// Replicas per data centre (`SimpleStrategy`: one, unnamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication(pub BTreeMap<String, u32>);

impl Replication {
    /// From `system_schema.keyspaces.replication`.
    pub fn parse(map: &HashMap<String, String>) -> Result<Self, String> {
        let class = map.get("class").map(String::as_str).unwrap_or("");
        let factor = |v: &str| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| format!("replication factor {v:?} in {map:?}"))
        };
        let mut dcs = BTreeMap::new();
        if class.ends_with("SimpleStrategy") {
            let rf = map
                .get("replication_factor")
                .ok_or_else(|| format!("no replication_factor in {map:?}"))?;
            dcs.insert(String::new(), factor(rf)?);
        } else if class.ends_with("NetworkTopologyStrategy") {
            for (dc, rf) in map {
                if dc != "class" && dc != "replication_factor" {
                    dcs.insert(dc.clone(), factor(rf)?);
                }
            }
            if dcs.is_empty() {
                let rf = map
                    .get("replication_factor")
                    .ok_or_else(|| format!("no data centre in {map:?}"))?;
                dcs.insert(String::new(), factor(rf)?);
            }
        } else if class.ends_with("LocalStrategy") {
            dcs.insert(String::new(), 1);
        } else {
            return Err(format!("unknown replication class {class:?}"));
        }
        Ok(Replication(dcs))
    }

    /// Replicas of every row, all data centres together.
    pub fn total(&self) -> u32 {
        self.0.values().sum()
    }
}

fn quorum(n: u32) -> u32 {
    n / 2 + 1
}

/// Replicas an operation at `level`, issued from data centre `from`, is
/// sure to reach in data centre `dc` (0 where it promises none there).
fn in_dc(level: Level, rep: &Replication, from: &str, dc: &str) -> u32 {
    let rf = rep.0.get(dc).copied().unwrap_or(0);
    match level {
        Level::All => rf,
        Level::EachQuorum => quorum(rf),
        Level::LocalQuorum if from == dc => quorum(rf),
        Level::LocalOne if from == dc => 1.min(rf),
        _ => 0,
    }
}

/// Replicas an operation at `level` from `from` is sure to reach in all.
fn anywhere(level: Level, rep: &Replication, from: &str) -> u32 {
    match level {
        Level::Any => 0,
        Level::One => 1,
        Level::Two => 2,
        Level::Three => 3,
        Level::Quorum => quorum(rep.total()),
        _ => rep.0.keys().map(|dc| in_dc(level, rep, from, dc)).sum(),
    }
}

/// `Ok` when every write and every later read share a replica, whichever
/// data centres they come from; otherwise why not.
pub fn check(rep: &Replication, read: Level, write: Level) -> Result<(), String> {
    for from_w in rep.0.keys() {
        for from_r in rep.0.keys() {
            let (w, r) = (anywhere(write, rep, from_w), anywhere(read, rep, from_r));
            let overlap_somewhere = w + r > rep.total()
                || rep.0.iter().any(|(dc, rf)| {
                    in_dc(write, rep, from_w, dc) + in_dc(read, rep, from_r, dc) > *rf
                });
            if !overlap_somewhere {
                let place = |dc: &str| {
                    if dc.is_empty() {
                        String::new()
                    } else {
                        format!(" from {dc}")
                    }
                };
                return Err(format!(
                    "write-consistency {} (a write{} reaches {w} replicas) and read-consistency {} (a read{} reaches {r}) may miss each other with {} replicas ({}): R + W must exceed RF for fencing. Use QUORUM for both, LOCAL_QUORUM for both in a single data centre, or EACH_QUORUM writes with LOCAL_QUORUM reads",
                    write.name(),
                    place(from_w),
                    read.name(),
                    place(from_r),
                    rep.total(),
                    rep.0
                        .iter()
                        .map(|(dc, rf)| if dc.is_empty() { format!("RF {rf}") } else { format!("{dc}: {rf}") })
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// Read the keyspace's replication and apply [`check`]: an error stops the
/// instance, unless `cassandra.unsafe-consistency` overrides it (logged as
/// an error at every start).
pub async fn enforce(session: &Session, config: &CassandraConfig) -> anyhow::Result<()> {
    let rep = replication(session, &config.keyspace).await?;
    match check(&rep, config.read_consistency, config.write_consistency) {
        Ok(()) => Ok(()),
        Err(why) if config.unsafe_consistency => {
            tracing::error!(
                keyspace = %config.keyspace,
                "cassandra.unsafe-consistency = true: starting although {why}; a stale owner's write may be acknowledged and acknowledged messages may be lost"
            );
            Ok(())
        }
        Err(why) => anyhow::bail!(
            "keyspace {}: {why} (or set cassandra.unsafe-consistency = true to start anyway)",
            config.keyspace
        ),
    }
}

/// The replication of `keyspace`, as `system_schema` has it.
pub async fn replication(session: &Session, keyspace: &str) -> anyhow::Result<Replication> {
    let result = session
        .query_unpaged(
            "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
            (keyspace,),
        )
        .await?
        .into_rows_result()?;
    let row = result
        .maybe_first_row::<(HashMap<String, String>,)>()?
        .ok_or_else(|| {
            anyhow::anyhow!("keyspace {keyspace} does not exist (run `confab cassandra init`)")
        })?;
    Replication::parse(&row.0).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(dcs: &[(&str, u32)]) -> Replication {
        Replication(dcs.iter().map(|(d, n)| (d.to_string(), *n)).collect())
    }

    #[test]
    fn quorum_or_stronger_pairs_pass_in_one_data_centre() {
        let one = rep(&[("", 3)]);
        for (r, w) in [
            (Level::Quorum, Level::Quorum),
            (Level::LocalQuorum, Level::LocalQuorum),
            (Level::One, Level::All),
            (Level::All, Level::One),
            (Level::Quorum, Level::EachQuorum),
        ] {
            assert_eq!(check(&one, r, w), Ok(()), "{r:?} {w:?}");
        }
        for (r, w) in [
            (Level::One, Level::Quorum),
            (Level::Quorum, Level::One),
            (Level::LocalOne, Level::LocalQuorum),
            (Level::One, Level::Any),
        ] {
            assert!(check(&one, r, w).is_err(), "{r:?} {w:?}");
        }
        // A single replica: anything that reaches it overlaps.
        assert_eq!(check(&rep(&[("", 1)]), Level::One, Level::One), Ok(()));
    }

    #[test]
    fn local_levels_need_each_quorum_writes_across_data_centres() {
        let two = rep(&[("dc1", 3), ("dc2", 3)]);
        assert_eq!(check(&two, Level::Quorum, Level::Quorum), Ok(()));
        assert_eq!(check(&two, Level::LocalQuorum, Level::EachQuorum), Ok(()));
        let refused = check(&two, Level::LocalQuorum, Level::LocalQuorum).unwrap_err();
        assert!(
            refused.contains("from dc1") && refused.contains("dc2: 3"),
            "{refused}"
        );
        assert!(check(&two, Level::Quorum, Level::LocalQuorum).is_err());
        // 1 + 4 of 6 replicas never overlap; 2 + 5 always do.
        assert!(check(&two, Level::One, Level::Quorum).is_err());
        assert_eq!(check(&two, Level::Two, Level::All), Ok(()));
    }

    #[test]
    fn replication_as_system_schema_shows_it() {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(
            Replication::parse(&map(&[
                ("class", "org.apache.cassandra.locator.SimpleStrategy"),
                ("replication_factor", "3")
            ])),
            Ok(rep(&[("", 3)]))
        );
        assert_eq!(
            Replication::parse(&map(&[
                (
                    "class",
                    "org.apache.cassandra.locator.NetworkTopologyStrategy"
                ),
                ("dc1", "3"),
                ("dc2", "2")
            ])),
            Ok(rep(&[("dc1", 3), ("dc2", 2)]))
        );
        // The test node's spelling.
        assert_eq!(
            Replication::parse(&map(&[
                ("class", "SimpleStrategy"),
                ("replication_factor", "1")
            ])),
            Ok(rep(&[("", 1)]))
        );
        assert!(Replication::parse(&map(&[("class", "EverywhereStrategy")])).is_err());
    }
}
