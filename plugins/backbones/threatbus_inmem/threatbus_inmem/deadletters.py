"""The in-memory backbone's dead-letter queue: a bounded list in the node's memory."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from threatbus.data import Message
from threatbus.deadletters import DEFAULT_LIST_LIMIT, DeadLetter, Replayed, now

logger = logging.getLogger(__name__)


class MemoryDeadLetters:
    """At most ``capacity`` dead letters, the oldest evicted first; thread-safe.

    ``resend`` puts a replayed message back on the bus (the node's publish queue).
    """

    def __init__(self, capacity: int, resend: Callable[[Message], None], node_name: str) -> None:
        self.capacity = capacity
        self.resend = resend
        self.node_name = node_name
        self._lock = threading.Lock()
        self._letters: OrderedDict[str, tuple[DeadLetter, Message]] = OrderedDict()
        self.added: Counter[str] = Counter()  # by reason
        self.evicted = 0
        self.replayed = 0

    def __len__(self) -> int:
        return len(self._letters)

    def add(self, message: Message, reason: str, detail: str, origin: str = "threatbus") -> None:
        if self.capacity <= 0:
            return
        letter = DeadLetter(
            id=uuid.uuid4().hex[:16],
            reason=reason,
            detail=detail,
            time=now(),
            origin=origin,
            node=self.node_name,
            body=message.encode(),
        )
        with self._lock:
            self._letters[letter.id] = (letter, message)
            self.added[reason] += 1
            while len(self._letters) > self.capacity:
                self._letters.popitem(last=False)
                self.evicted += 1

    def list(self, limit: int = DEFAULT_LIST_LIMIT) -> list[DeadLetter]:
        with self._lock:
            return [letter for letter, _ in list(self._letters.values())[: max(0, limit)]]

    def get(self, letter_id: str) -> DeadLetter | None:
        with self._lock:
            found = self._letters.get(letter_id)
        return found[0] if found else None

    def replay(self, ids: Sequence[str] | None) -> Replayed:
        with self._lock:
            wanted = list(self._letters) if ids is None else list(dict.fromkeys(ids))
            taken = [(i, self._letters.pop(i)[1]) for i in wanted if i in self._letters]
        for _letter_id, message in taken:
            self.resend(message)
        self.replayed += len(taken)
        replayed = [letter_id for letter_id, _ in taken]
        if replayed:
            logger.info("replayed %d dead letter(s)", len(replayed))
        return Replayed(replayed, [i for i in wanted if i not in set(replayed)])

    def purge(self) -> int:
        with self._lock:
            count = len(self._letters)
            self._letters.clear()
        if count:
            logger.info("purged %d dead letter(s)", count)
        return count

    def close(self) -> None:
        pass
