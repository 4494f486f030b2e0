"""Backend leases in PostgreSQL: one driving bridge per backend, spread evenly over the live bridges.

A bridge is live while its heartbeat (written by every lease round) is younger than 0.6 × the lease
TTL, and a lease lasts as long after its renewal (see VALID).
Each round runs in one transaction under an advisory lock, so rounds of different bridges never
interleave, and every expiry is judged by the database's clock (`now()`), never by a bridge's.

The even spread: with n backends and b live bridges, no bridge keeps more than ceil(n / b), and while
another live bridge holds fewer than floor(n / b), the bridge holding the most gives one up (so 2/2/0
over three bridges becomes 2/1/1, one lease moving). Only backends that run nothing are given up; a busy one
stays until it is idle. A bridge takes free or expired leases up to its share, but not while another
live bridge is starving and it already holds its floor, so what one bridge gives up reaches the one
that needs it instead of coming straight back.

After an outage of the database longer than the TTL every lease and heartbeat has expired: the first
bridge back would see itself alone and take every backend from bridges that still drive them. So a
bridge back from an outage takes no expired lease for one TTL; meanwhile the others come back and
renew their own (a dead bridge's backends move one TTL later than usual).
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

LEASE_LOCK = 0x636F6D66_0002  # pg_advisory_xact_lock key of lease rounds ("comf" + 2)
FORGET_AFTER = 6  # bridges silent for this many TTLs leave the bridges table (and their presence rows)
# A lease, and a heartbeat, counts for this part of the TTL after its renewal. Renewed every TTL/3, a
# lease forgives one late renewal; and a dead bridge's backends are taken within the TTL of its death:
# its lease runs out at most 0.6 TTL after the kill, and a survivor looks again within TTL/3 (+ jitter).
VALID = 0.6


def lifetime(ttl: float) -> float:
    """Seconds a lease or heartbeat counts after its renewal, for a bridge's lease_ttl."""
    return ttl * VALID


async def round_of(conn: PoolConnectionProxy[Any], instance: str, name: str, backends: list[str],
                   ttl: float, take_expired: bool = True) -> set[str]:
    """One lease round of `instance`, inside the caller's transaction; returns the backends it holds.
    With take_expired False it takes only leases nobody holds (see the module's docstring)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", LEASE_LOCK)
    await heartbeat(conn, instance, name)
    valid = lifetime(ttl)
    await conn.execute("WITH gone AS (DELETE FROM bridges WHERE heartbeat < now() - make_interval(secs => $1)"
                       " RETURNING instance) DELETE FROM presence WHERE instance IN (SELECT instance FROM gone)",
                       ttl * FORGET_AFTER)
    await conn.execute("DELETE FROM presence WHERE instance = $1 AND count <= 0", instance)
    await conn.execute("DELETE FROM leases WHERE holder = $1 AND NOT (backend = ANY($2::text[]))", instance, backends)
    held = {r[0] for r in await conn.fetch(
        "UPDATE leases SET expires_at = now() + make_interval(secs => $2) WHERE holder = $1 RETURNING backend",
        instance, valid)}
    live = [r[0] for r in await conn.fetch(
        "SELECT instance FROM bridges WHERE heartbeat > now() - make_interval(secs => $1)", valid)]
    current = await conn.fetch("SELECT backend, holder FROM leases WHERE expires_at > now()"
                               " AND backend = ANY($1::text[])", backends)
    holding = Counter(r[1] for r in current)
    bridges = max(1, len(set(live) | {instance}))
    ceil_share, floor_share = -(-len(backends) // bridges), len(backends) // bridges
    starving = any(holding.get(other, 0) < floor_share for other in live if other != instance)
    # of the bridges holding the most, one (the first by name) gives one up to a starving bridge
    richest = min(live, key=lambda other: (-holding.get(other, 0), other), default=instance)

    excess = len(held) - ceil_share
    if excess <= 0 and starving and len(held) > floor_share and richest == instance:
        excess = 1
    if excess > 0:
        busy = {r[0] for r in await conn.fetch(
            "SELECT DISTINCT backend FROM jobs WHERE state IN ('dispatching', 'running') AND backend = ANY($1::text[])",
            list(held))}
        extras = sorted(held - busy)[:excess]
        await conn.execute("DELETE FROM leases WHERE holder = $1 AND backend = ANY($2::text[])", instance, extras)
        return held - set(extras)

    wanted = ceil_share - len(held) if not starving or len(held) < floor_share else 0
    if wanted > 0:
        taken = {r[0] for r in current} if take_expired else {r[0] for r in await conn.fetch(
            "SELECT backend FROM leases WHERE backend = ANY($1::text[])", backends)}
        free = [b for b in backends if b not in taken][:wanted]
        held |= {r[0] for r in await conn.fetch(
            "INSERT INTO leases (backend, holder, expires_at)"
            " SELECT b, $1, now() + make_interval(secs => $2) FROM unnest($3::text[]) AS b"
            " ON CONFLICT (backend) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at"
            " WHERE leases.expires_at <= now() RETURNING backend", instance, valid, free)}
    return held


async def heartbeat(conn: PoolConnectionProxy[Any], instance: str, name: str) -> None:
    """Record that this bridge is alive now."""
    await conn.execute("INSERT INTO bridges (instance, name) VALUES ($1, $2)"
                       " ON CONFLICT (instance) DO UPDATE SET heartbeat = now()", instance, name)


async def release(conn: PoolConnectionProxy[Any], instance: str) -> None:
    """Give up every lease, and leave the live bridges (clean shutdown)."""
    await conn.execute("DELETE FROM leases WHERE holder = $1", instance)
    await conn.execute("DELETE FROM presence WHERE instance = $1", instance)
    await conn.execute("DELETE FROM bridges WHERE instance = $1", instance)
