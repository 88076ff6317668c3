//! Partition ownership leased in PostgreSQL (manual assignment; no Kafka group rebalancing).
//!
//! Every member heartbeats `aggregator_members`. The live members, sorted by name, split the
//! partitions alike: partition p belongs to member p mod n. A member takes a lease only when it
//! is free, expired or already its own, and every take bumps the generation; the flush checks
//! (owner, generation) under `FOR UPDATE`, so a member that lost a partition — stalled past its
//! lease, partitioned from PostgreSQL, replaced — cannot commit for it.

use std::collections::BTreeMap;
use std::time::Duration;
use tokio_postgres::Client;

#[derive(Debug, Clone)]
pub struct Leases {
    pub group: String,
    pub topic: String,
    pub member: String,
    pub ttl: Duration,
}

/// A lease this member holds, with where the partition's stored state stands.
#[derive(Debug, Clone, Copy)]
pub struct Taken {
    pub generation: i64,
    pub next_offset: Option<i64>,
    pub watermark: i64,
}

impl Leases {
    fn ttl_text(&self) -> String {
        format!("{} milliseconds", self.ttl.as_millis())
    }

    /// Heartbeats and returns the live members, sorted.
    pub async fn heartbeat(&self, db: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
        db.execute(
            "INSERT INTO aggregator_members (consumer_group, member) VALUES ($1, $2)
             ON CONFLICT (consumer_group, member) DO UPDATE SET heartbeat_at = now()",
            &[&self.group, &self.member],
        )
        .await?;
        let rows = db
            .query(
                "SELECT member FROM aggregator_members
                  WHERE consumer_group = $1 AND heartbeat_at > now() - $2::text::interval
                  ORDER BY member",
                &[&self.group, &self.ttl_text()],
            )
            .await?;
        let mut members: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        if !members.contains(&self.member) {
            members.push(self.member.clone());
            members.sort();
        }
        Ok(members)
    }

    /// The partitions this member should own among `members`.
    pub fn desired(&self, members: &[String], partitions: i32) -> Vec<i32> {
        let n = members.len().max(1);
        let me = members.iter().position(|m| *m == self.member).unwrap_or(0);
        (0..partitions)
            .filter(|p| (*p as usize) % n == me)
            .collect()
    }

    /// Takes the lease of `partition` if it is free, expired or this member's, bumping the
    /// generation; `None` while another live member holds it.
    pub async fn acquire(
        &self,
        db: &Client,
        partition: i32,
    ) -> Result<Option<Taken>, tokio_postgres::Error> {
        let row = db
            .query_opt(
                "INSERT INTO partition_leases AS l (consumer_group, topic, partition, owner, generation, expires_at)
                 VALUES ($1, $2, $3, $4, 1, now() + $5::text::interval)
                 ON CONFLICT (consumer_group, topic, partition) DO UPDATE
                    SET owner = EXCLUDED.owner, generation = l.generation + 1, expires_at = EXCLUDED.expires_at
                  WHERE l.expires_at < now() OR l.owner = EXCLUDED.owner
                 RETURNING generation",
                &[&self.group, &self.topic, &partition, &self.member, &self.ttl_text()],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let generation: i64 = row.get(0);
        let stored = db
            .query_opt(
                "SELECT next_offset, watermark_unix_nanos FROM consumer_offsets
                  WHERE consumer_group = $1 AND topic = $2 AND partition = $3",
                &[&self.group, &self.topic, &partition],
            )
            .await?;
        Ok(Some(Taken {
            generation,
            next_offset: stored.as_ref().map(|r| r.get(0)),
            watermark: stored.as_ref().map(|r| r.get(1)).unwrap_or(0),
        }))
    }

    /// Renews the given leases; returns the partitions whose lease is no longer this member's.
    pub async fn renew(
        &self,
        db: &Client,
        held: &BTreeMap<i32, i64>,
    ) -> Result<Vec<i32>, tokio_postgres::Error> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<i32> = held.keys().copied().collect();
        let gens: Vec<i64> = held.values().copied().collect();
        let rows = db
            .query(
                "UPDATE partition_leases l SET expires_at = now() + $5::text::interval
                   FROM unnest($3::int4[], $4::int8[]) AS s(p, g)
                  WHERE l.consumer_group = $1 AND l.topic = $2 AND l.partition = s.p
                    AND l.owner = $6 AND l.generation = s.g
                 RETURNING l.partition",
                &[
                    &self.group,
                    &self.topic,
                    &parts,
                    &gens,
                    &self.ttl_text(),
                    &self.member,
                ],
            )
            .await?;
        let renewed: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        Ok(parts.into_iter().filter(|p| !renewed.contains(p)).collect())
    }

    /// Gives a lease up at once (after a flush), so the next owner need not wait for expiry.
    pub async fn release(
        &self,
        db: &Client,
        partition: i32,
        generation: i64,
    ) -> Result<(), tokio_postgres::Error> {
        db.execute(
            "UPDATE partition_leases SET expires_at = now() - interval '1 millisecond'
              WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND owner = $4 AND generation = $5",
            &[&self.group, &self.topic, &partition, &self.member, &generation],
        )
        .await?;
        Ok(())
    }

    /// Leaves the group (clean shutdown): the others rebalance at their next tick.
    pub async fn leave(&self, db: &Client) -> Result<(), tokio_postgres::Error> {
        db.execute(
            "DELETE FROM aggregator_members WHERE consumer_group = $1 AND member = $2",
            &[&self.group, &self.member],
        )
        .await?;
        Ok(())
    }
}
