"""The overlap strategy against a key service without successors (the contract as the payment API
publishes it: aliases unique per Client ID, no `Replaces`/`ReplacedBy`): the alias-template mode.

`AliasSuccessors` wraps such a key service so that the rest of the engine sees the links it would
see from one with successors. A successor is created under a derived alias (`payouts--r3`, from the
lineage's base alias and `keyservice.alias_template`), and a key is linked to another only by proof:

- the create's own answer (sent, or replayed under its Idempotency-Key, which only this rotation of
  that key derives), which names the new key as the successor of the key it was created for;
- the sinks' documents: the place of base alias `B` names the key that serves it, its `base_alias`
  and the key it `replaces`;
- for a key no document names yet (its create's store never finished, and the state store was
  lost), the create's stored answer, replayed under each Idempotency-Key the create for one of its
  lineage's older keys may have used.

A listing alone proves nothing: a person's key named `payouts--r2` is its own base. What is proved
is kept in the state store (`lineage_links`) and rebuilt from the sinks when it is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from rotator import logs
from rotator.aliases import AliasTemplate
from rotator.domain import ApiKey, ClientInfo, IssuedKey, Replay, ReplayAnswer, Scope, Secret
from rotator.errors import NotFoundError, OtherKeyError, ProtocolError, RefusedError, RotatorError, TransientError
from rotator.protocol import MAX_EPOCHS, idempotency_key
from rotator.protocols import KeyService, SecretSink, StateStore
from rotator.safety import text_problem

log = logs.get("rotator.engine")
Links = dict[str, dict[str, Any]]


class AliasSuccessors:
    """A key service without successors, seen as one with them (see the module)."""

    def __init__(self, inner: KeyService, template: AliasTemplate, state: StateStore,
                 sinks: list[SecretSink], creates: Callable[[ApiKey], Iterator[str]] | None = None) -> None:
        """`creates`: the Idempotency-Keys, epoch by epoch, of a create of a key's successor
        (`creates_of`); without it, a key no document names is never proved from its create's answer."""
        self.inner, self.template, self.state, self.sinks, self.creates = inner, template, state, sinks, creates
        # What this process proved, beside what the store kept: a proof whose write failed still
        # places the rotation that made it (a reset's answer is read back a moment later).
        self._proved: dict[str, Links] = {}

    def __getattr__(self, name: str) -> Any:
        """Everything else the adapter offers (its budget, `stores_answers`, `verify_timeout_s`, …)."""
        if name in ("inner", "template", "state", "sinks", "creates", "_proved") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- reading -------------------------------------------------------------------------------

    def list_clients(self) -> Iterator[ClientInfo]:
        return self.inner.list_clients()

    def list_keys(self, client_id: str) -> Iterator[ApiKey]:
        """The listing, with the links the state store holds. A key named like a derived alias that
        the store knows nothing of (it was lost) is proved from the sinks here, once: a sweep or a
        repair must see a lineage as the rotations do. A sink that cannot be read leaves it unlinked
        for now; the listing never fails for it."""
        keys = list(self.inner.list_keys(client_id))
        links = self.state.lineage_links(client_id)
        for key in keys:
            if key.key_id not in links and self.template.parse(key.alias) is not None:
                try:
                    links = self.prove(client_id, key, keys)
                except TransientError as exc:
                    log.warning("lineage.unproved", client_id=client_id, key_id=key.key_id, error=str(exc))
        present = {key.key_id for key in keys}
        return iter([linked(key, links, present) for key in keys])

    def get_key(self, client_id: str, key_id: str) -> ApiKey:
        """The key with its proved lineage: from the state store, else proved from the sinks now
        (and kept). A linked key that is gone (a person revoked it) unlinks."""
        key = self.inner.get_key(client_id, key_id)
        links = self.state.lineage_links(client_id)
        if key_id not in links:
            links = self.prove(client_id, key)
        entry = links.get(key_id, {})
        present = {key_id}
        for other in (entry.get("replaces"), entry.get("replaced_by")):
            if isinstance(other, str) and self._lives(client_id, other):
                present.add(other)
        return linked(key, links, present)

    def _lives(self, client_id: str, key_id: str) -> bool:
        try:
            self.inner.get_key(client_id, key_id)
        except NotFoundError:
            self.unlink(client_id, key_id)
            return False
        return True

    # -- proof from the sinks ------------------------------------------------------------------

    def prove(self, client_id: str, key: ApiKey, listing: list[ApiKey] | None = None) -> Links:
        """Which lineage `key` belongs to, as the sinks' documents prove it, kept in the state store.
        Its proposed base (its alias parsed by the template) first, then its own alias. A sink that
        cannot be read proves nothing either way: TransientError, nothing kept."""
        keys = {k.key_id: k for k in (self.inner.list_keys(client_id) if listing is None else listing)}
        keys.setdefault(key.key_id, key)
        parsed = self.template.parse(key.alias)
        for base in ([parsed[0]] if parsed else []) + [key.alias]:
            proved = self._held_at(base, keys)
            if key.key_id in proved:
                break
        else:
            proved = self._created_for(client_id, key, keys)
        how = "merge" if proved else "new"  # its own base: kept only where nothing is known of it
        proved = proved or {key.key_id: {"base": key.alias}}
        self._keep(client_id, proved, how)
        return {**proved, **self.state.lineage_links(client_id)}

    def _links(self, client_id: str) -> Links:
        """The links kept in the store, over what this process proved (the store's are the newer):
        what places a create's or a reset's answer, a moment after the rotation proved its key. A
        key read anew is proved from the store and the sinks, never from this memory."""
        return {**self._proved.get(client_id, {}), **self.state.lineage_links(client_id)}

    def _keep(self, client_id: str, links: Links, how: str = "merge") -> None:
        """Keep what is proved, merged into what is kept (a link written since the proof was read,
        a create's, is never dropped); a key found to be its own base is kept only where nothing is.
        Only a cache: a state store that refuses the write (a read-only user's status page, Redis
        down) costs a proof from the sinks next time, nothing more. `create`: the create's own
        answer, which wins over any proof read before it (it merges whatever was kept)."""
        try:
            if how == "merge":  # a key proved once to be of one lineage is never moved to another
                kept = self.state.lineage_links(client_id)
                moved = [k for k, v in links.items() if k in kept and kept[k].get("base") not in (None, v.get("base"))]
                for key_id in moved:
                    log.warning("lineage.conflict", client_id=client_id, key_id=key_id)
                links = {k: v for k, v in links.items() if k not in moved}
            memory = self._proved.setdefault(client_id, {})
            for key_id, entry in links.items():
                if how != "new" or key_id not in memory:
                    memory[key_id] = {**memory.get(key_id, {}), **entry}
            self.state.put_lineage_links(client_id, links, "merge" if how == "create" else how)
        except Exception as exc:  # any store's error: the proof stands without it
            log.warning("lineage.not_kept", client_id=client_id, error=type(exc).__name__)

    def _held_at(self, base: str, keys: dict[str, ApiKey]) -> Links:
        """The links the documents at base alias `base`'s place prove: the key each sink's document
        names (a key of that lineage's aliases only), and the key that document says it replaces,
        when every document naming that key says the same (a key gone since counts as none) and it
        is an older key of the lineage's own aliases."""
        members = [k for k in keys.values() if self.template.number(k.alias, base) is not None]
        proved: Links = {}
        claims: dict[str, set[str | None]] = {}
        for sink in self.sinks:
            for member in members:
                probe = replace(member, lineage_base=base, replaces=None, replaced_by=None)
                try:
                    stored = sink.read_state(probe)
                except OtherKeyError:
                    continue  # another key's document: maybe the next member's
                except RotatorError as exc:
                    raise TransientError(f"cannot prove the lineage of alias {base!r}: {sink.describe()} "
                                         f"cannot be read ({exc})") from None
                if stored is not None:
                    proved.setdefault(member.key_id, {"base": base})
                    claims.setdefault(member.key_id, set()).add(stored.replaces if stored.replaces in keys else None)
                break  # the place holds this member's document, or nothing
        for member_id, said in claims.items():
            if len(said) > 1:
                raise TransientError(f"cannot prove the lineage of alias {base!r}: the sinks' documents disagree on "
                                     f"the key {member_id} replaces")
            replaced = keys.get(next(iter(said)) or "")
            rank = None if replaced is None else self.template.number(replaced.alias, base)
            serving = self.template.number(keys[member_id].alias, base) or 0  # a member: never None
            if replaced is not None and rank is not None and rank < serving:
                proved[member_id]["replaces"] = replaced.key_id
                proved.setdefault(replaced.key_id, {"base": base})["replaced_by"] = member_id
        return proved

    def _created_for(self, client_id: str, key: ApiKey, keys: dict[str, ApiKey]) -> Links:
        """The links the create that made `key` proves, when its stored answer is still kept: tried
        for each older live key of the lineage its alias proposes, epoch by epoch, until the key
        service has nothing stored. A replay that fails proves nothing either way: TransientError."""
        parsed = self.template.parse(key.alias)
        if parsed is None or self.creates is None:
            return {}
        base, n = parsed
        older = [k for k in keys.values() if k.key_id != key.key_id and k.created_at <= key.created_at
                 and (rank := self.template.number(k.alias, base)) is not None and rank < n]
        for predecessor in older:
            for ik in self.creates(predecessor):
                answer = self.inner.replay_create(client_id, None, ik)
                if answer.kind is Replay.UNKNOWN:
                    raise TransientError(f"cannot prove the lineage of {key.key_id}: {answer.reason}")
                if answer.kind is Replay.EMPTY:
                    break
                if answer.kind is Replay.ANSWER and answer.issued is not None and \
                        answer.issued.key.key_id == key.key_id:
                    return {key.key_id: {"base": base, "replaces": predecessor.key_id},
                            predecessor.key_id: {"base": base, "replaced_by": key.key_id}}
        return {}

    # -- writing -------------------------------------------------------------------------------

    def create_key(self, client_id: str, alias: str, scopes: tuple[Scope, ...], idempotency_key: str,
                   replaces: str | None = None) -> IssuedKey:
        """With `replaces`: that key's successor, under the lineage's next free alias, with the same
        scopes. The link is kept before the answer is returned (a crash after it leaves the
        create's replay, which links again)."""
        if replaces is None:
            return self.inner.create_key(client_id, alias, scopes, idempotency_key)
        entry = self._links(client_id).get(replaces) or self.prove(
            client_id, self.inner.get_key(client_id, replaces)).get(replaces, {})
        base = str(entry.get("base") or alias)
        taken = {key.alias for key in self.inner.list_keys(client_id)}
        wanted = self.template.next_free(base, alias, taken)
        problem = text_problem(wanted)
        if problem is not None:  # refused here, before it is sent: certain not to have run
            raise RefusedError(f"the next alias of lineage {base!r} {problem}; nothing was sent", status=None,
                               stored=True)
        issued = self.inner.create_key(client_id, wanted, scopes, idempotency_key)
        if issued.key.alias != wanted:
            raise ProtocolError(f"the create answered alias {issued.key.alias!r}, not {wanted!r}")
        return IssuedKey(self._link_created(client_id, issued.key, replaces, base), issued.secret)

    def replay_create(self, client_id: str, replaces: str | None, idempotency_key: str) -> ReplayAnswer:
        """The stored answer of the create for `replaces`: only that key's rotation derives this
        Idempotency-Key, so the key it names is `replaces`' successor, proved."""
        answer = self.inner.replay_create(client_id, None, idempotency_key)
        if replaces is None or answer.kind is not Replay.ANSWER or answer.issued is None:
            return answer
        created = answer.issued.key
        entry = self._links(client_id).get(replaces, {})
        parsed = self.template.parse(created.alias)
        base = entry.get("base") or (parsed[0] if parsed else None)
        if not isinstance(base, str) or self.template.number(created.alias, base) is None:
            return ReplayAnswer(Replay.UNKNOWN, reason=f"the stored create answered alias {created.alias!r}, "
                                                       "which the alias template does not derive")
        key = self._link_created(client_id, created, replaces, base)
        return ReplayAnswer(answer.kind, IssuedKey(key, answer.issued.secret), answer.reason)

    def alias_problem(self, key: ApiKey) -> str | None:
        """Why the lineage's next key could not be created (its alias breaks the key service's rules),
        or None: asked before an attempt is recorded, so nothing is sent."""
        taken = {listed.alias for listed in self.inner.list_keys(key.client_id)}
        wanted = self.template.next_free(key.base_alias, key.alias, taken)
        problem = text_problem(wanted)
        return None if problem is None else f"the next alias of lineage {key.base_alias!r} ({wanted[:40]!r}…) {problem}"

    def _link_created(self, client_id: str, created: ApiKey, replaces: str, base: str) -> ApiKey:
        self._keep(client_id, {
            created.key_id: {"base": base, "replaces": replaces},
            replaces: {"base": base, "replaced_by": created.key_id}}, "create")
        log.info("lineage.linked", client_id=client_id, key_id=created.key_id, replaces=replaces)
        return replace(created, lineage_base=None if base == created.alias else base, replaces=replaces)

    def reset_key(self, client_id: str, key_id: str, idempotency_key: str) -> IssuedKey:
        issued = self.inner.reset_key(client_id, key_id, idempotency_key)
        return IssuedKey(self._as_linked(client_id, issued.key), issued.secret)

    def replay(self, client_id: str, key_id: str, idempotency_key: str) -> ReplayAnswer:
        answer = self.inner.replay(client_id, key_id, idempotency_key)
        if answer.issued is None:
            return answer
        return ReplayAnswer(answer.kind, IssuedKey(self._as_linked(client_id, answer.issued.key),
                                                   answer.issued.secret), answer.reason)

    def _as_linked(self, client_id: str, key: ApiKey) -> ApiKey:
        """A reset's answer keeps the key's place and its links (its document goes on naming the key
        it replaces: after a lost Redis, that is the proof). No read here: the rotation read the key,
        and proved it, just before."""
        links = self._links(client_id)
        entry = links.get(key.key_id, {})
        return linked(key, links, {key.key_id, *(str(v) for n, v in entry.items() if n in ("replaces", "replaced_by"))})

    def revoke_key(self, client_id: str, key_id: str) -> None:
        """Revoke, then forget the key's links: only once it is surely gone (a revoke that failed,
        or whose answer was lost, leaves them; a link to a key that is gone counts for nothing)."""
        try:
            self.inner.revoke_key(client_id, key_id)
        except NotFoundError:
            self.unlink(client_id, key_id)
            raise
        self.unlink(client_id, key_id)

    def unlink(self, client_id: str, key_id: str) -> None:
        """`key_id` is gone: its entry goes, and so does every link to it (its partner keeps its base:
        its place does not move). One atomic step in the store; like every write here, a cache's."""
        memory = self._proved.get(client_id, {})
        memory.pop(key_id, None)
        for entry in memory.values():
            for name in ("replaces", "replaced_by"):
                if entry.get(name) == key_id:
                    del entry[name]
        try:
            self.state.drop_lineage_links(client_id, [key_id])
        except Exception as exc:  # any store's error: a link to a gone key counts for nothing (`linked`)
            log.warning("lineage.not_kept", client_id=client_id, error=type(exc).__name__)

    def verify_secret(self, client_id: str, secret: Secret, key_id: str | None = None) -> bool:
        return self.inner.verify_secret(client_id, secret, key_id=key_id)

    def close(self) -> None:
        self.inner.close()


def linked(key: ApiKey, links: Links, present: set[str]) -> ApiKey:
    """`key` with the lineage `links` hold for it: its base, and its links to keys in `present`
    only (a link to a revoked key is no link), each confirmed from both ends."""
    entry = links.get(key.key_id)
    if not entry:
        return key
    base = entry.get("base")
    replaces, replaced_by = entry.get("replaces"), entry.get("replaced_by")
    if replaces not in present or links.get(str(replaces), {}).get("replaced_by") != key.key_id:
        replaces = None
    if replaced_by not in present or links.get(str(replaced_by), {}).get("replaces") != key.key_id:
        replaced_by = None
    return replace(key, lineage_base=base if isinstance(base, str) and base != key.alias else None,
                   replaces=replaces, replaced_by=replaced_by)


def creates_of(mac: bytes) -> Callable[[ApiKey], Iterator[str]]:
    """The Idempotency-Keys a create of `key`'s successor may have been sent with, epoch by epoch
    (`protocol.idempotency_key`, derived with the workers' secret `mac`)."""
    return lambda key: (idempotency_key(mac, key.ref, key.generation, epoch, "create") for epoch in range(MAX_EPOCHS))
