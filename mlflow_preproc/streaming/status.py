"""``mlflow-preproc status``: how a stream's consumer group is doing, at a glance.

    mlflow-preproc status --group fink-stream --topic ztf-alerts \\
        --metrics http://stream-0:9100 --metrics http://stream-1:9100

From the broker: the group's state and members, and per partition of ``--topic`` its
committed offset, end offset and lag. From each instance's metrics endpoint (``METRICS_PORT``),
scraped twice ``interval`` seconds apart: the partitions it owns, librdkafka's lag of each,
records in/out/failed (totals and rates), dead letters by stage and error type, the brake,
and the dependency it waits for. Reading commits nothing and joins no group.

A group the broker does not know is an error, not an empty group: a misspelled ``--group``
must not read like a stopped stream. A broker whose answers contradict each other (the
embedded Tansu broker lists no members of a stable group, and its end offsets fall behind the
committed ones) is shown as it answers, with what contradicts what: the instances' own lag
(librdkafka's, from its fetch responses) is the one to trust then.
"""

from __future__ import annotations

import concurrent.futures
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from mlflow_preproc.streaming.no_broker import cannot_reach


# A group in these states has members; a broker that lists none for it is not answering right.
_WITH_MEMBERS = ("STABLE", "PREPARING_REBALANCE", "COMPLETING_REBALANCE")


class StatusError(RuntimeError):
    """The status cannot be read; the message says why and what to change."""


@dataclass
class Instance:
    """What one instance's metrics endpoint says."""

    url: str
    partitions: int = 0
    lag: dict[str, float] = field(default_factory=dict)  # "topic/partition" -> lag
    records: dict[str, float] = field(default_factory=dict)  # outcome -> total
    rates: dict[str, float] = field(default_factory=dict)  # outcome -> per second
    dead_letters: dict[str, float] = field(default_factory=dict)  # "stage/error type" -> n
    brake: bool = False
    waiting: bool = False
    error: str | None = None

    def as_text(self) -> str:
        if self.error:
            return f"instance {self.url}: cannot read its metrics ({self.error})"
        counts = ", ".join(f"{k} {self.records.get(k, 0):.0f} ({self.rates.get(k, 0):.1f}/s)"
                           for k in ("in", "out", "failed"))
        lag = " ".join(f"{k}={v:.0f}" for k, v in sorted(self.lag.items())) or "-"
        dead = ", ".join(f"{k} {v:.0f}" for k, v in sorted(self.dead_letters.items())) or "none"
        flags = [*(["dead-letter brake ENGAGED"] if self.brake else []),
                 *(["waiting for a dependency"] if self.waiting else [])]
        return (f"instance {self.url}: {self.partitions} partitions, lag {lag}; records "
                f"{counts}; dead letters {dead}" + (f"; {', '.join(flags)}" if flags else ""))


@dataclass
class GroupStatus:
    """The group as the broker and the instances report it."""

    group: str
    state: str = "?"
    members: list[dict[str, Any]] = field(default_factory=list)
    partitions: list[dict[str, Any]] = field(default_factory=list)
    instances: list[Instance] = field(default_factory=list)

    @property
    def inconsistencies(self) -> list[str]:
        """Where the broker's answers contradict each other or the instances'."""
        found = [f"{p['topic']}/{p['partition']} is committed up to {p['committed']}, past "
                 f"its end offset {p['end']}" for p in self.partitions
                 if p["committed"] is not None and p["committed"] > p["end"]]
        if not self.members and self.state in _WITH_MEMBERS:
            found.append(f"the group is {self.state} but the broker lists no members")
        owning = [i.url for i in self.instances if i.partitions]
        if not self.members and owning:
            found.append(f"{', '.join(owning)} own partitions but the broker lists no members")
        return found

    def as_json(self) -> dict:
        return {"group": self.group, "state": self.state, "members": self.members,
                "partitions": self.partitions,
                "instances": [vars(i) for i in self.instances],
                "inconsistencies": self.inconsistencies}

    def as_text(self) -> str:
        members = "; ".join(f"{m['client_id']} on {m['host']} ({m['partitions']})"
                            for m in self.members) or "the broker lists none"
        lines = [f"group {self.group}: {self.state}; members: {members}"]
        if self.inconsistencies:
            lines.append("the broker's answers are inconsistent (" +
                         "; ".join(self.inconsistencies) + "): its lag and members are not "
                         "to be trusted; the instances' own lag is (--metrics)")
        if self.partitions:
            lines += ["", f"{'partition':<24} {'committed':>10} {'end':>10} {'lag':>8}"]
            lines += [f"{p['topic'] + '/' + str(p['partition']):<24} {_n(p['committed']):>10} "
                      f"{_n(p['end']):>10} {_n(p['lag']):>8}" for p in self.partitions]
        if self.instances:
            lines += ["", *(i.as_text() for i in self.instances)]
        return "\n".join(lines)


def status(kafka: dict, group: str, topic: str | None = None,
           metrics: tuple[str, ...] = (), interval: float = 2.0) -> GroupStatus:
    """Read ``group``'s status from the broker and the ``metrics`` endpoints."""
    result = GroupStatus(group)
    _from_broker(kafka, group, topic, result)
    first = [_scrape(url) for url in metrics]
    if metrics:
        time.sleep(interval)
    for url, before in zip(metrics, first):
        result.instances.append(_instance(url, before, _scrape(url), interval))
    return result


def _from_broker(kafka: dict, group: str, topic: str | None, result: GroupStatus) -> None:
    from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient, OffsetSpec

    admin = AdminClient(kafka)
    servers = kafka.get("bootstrap.servers")
    try:  # first, whether a broker answers at all (the group calls would only time out)
        meta = admin.list_topics(topic, timeout=10) if topic else admin.list_topics(timeout=10)
    except KafkaException as exc:
        raise StatusError(cannot_reach(servers, exc.args[0].str())) from None
    try:
        listed = admin.list_consumer_groups(request_timeout=15).result(15)
        if group not in {g.group_id for g in listed.valid}:
            raise StatusError(f"group {group} does not exist on {servers} (the broker has "
                              "never seen it, or its offsets expired); pass the stream's "
                              "CONSUMER_GROUP_ID (default mlflow-preproc-{model name})")
        described = admin.describe_consumer_groups([group])[group].result(15)
        result.state = described.state.name
        result.members = [{"client_id": m.client_id, "host": m.host, "partitions": ",".join(
            f"{tp.topic}/{tp.partition}" for tp in m.assignment.topic_partitions)}
            for m in described.members]
        if not topic:
            return
        found = meta.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise StatusError(f"topic {topic} does not exist on {servers}; pass the stream's "
                              "INPUT_TOPIC")
        wanted = [TopicPartition(topic, p) for p in sorted(found.partitions)]
        committed = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, wanted)])[group].result(15)
        ends = {tp: future.result(15) for tp, future in admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in wanted}).items()}
    except KafkaException as exc:  # e.g. an ACL: the broker's reason says it
        raise StatusError(f"cannot read group {group} from {servers} "
                          f"({exc.args[0].str()})") from None
    except concurrent.futures.TimeoutError:
        raise StatusError(f"cannot read group {group} from {servers}: the broker did not "
                          "answer in 15 s; run it again") from None
    by_partition = {tp.partition: tp.offset for tp in committed.topic_partitions}
    for tp, answer in ends.items():
        end = answer.offset
        done = by_partition.get(tp.partition, -1001)
        done = None if done < 0 else done
        result.partitions.append({"topic": tp.topic, "partition": tp.partition,
                                  "committed": done, "end": end,
                                  "lag": None if done is None or done > end else end - done})
    result.partitions.sort(key=lambda p: p["partition"])


def _scrape(url: str) -> dict[str, list[tuple[dict, float]]] | str:
    from prometheus_client.parser import text_string_to_metric_families

    target = url.rstrip("/") + ("" if url.rstrip("/").endswith("/metrics") else "/metrics")
    try:
        with urllib.request.urlopen(target, timeout=10) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return f"{target}: {getattr(exc, 'reason', exc)}"
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def _instance(url: str, before: Any, after: Any, interval: float) -> Instance:
    found = Instance(url)
    if isinstance(after, str) or isinstance(before, str):
        found.error = after if isinstance(after, str) else before
        return found

    def total(samples, name: str, key: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, value in samples.get(name, []):
            out[labels[key]] = out.get(labels[key], 0) + value
        return out

    def first(name: str) -> float:
        return sum(v for _, v in after.get(name, []))

    found.partitions = int(first("mlflow_preproc_partitions_assigned"))
    found.lag = {f"{l['topic']}/{l['partition']}": v
                 for l, v in after.get("mlflow_preproc_consumer_lag", [])}
    found.records = total(after, "mlflow_preproc_records_total", "outcome")
    earlier = total(before, "mlflow_preproc_records_total", "outcome")
    found.rates = {k: (v - earlier.get(k, 0)) / interval for k, v in found.records.items()}
    found.dead_letters = {f"{l['stage']}/{l['error_type']}": v
                          for l, v in after.get("mlflow_preproc_dead_letters_total", [])}
    found.brake = first("mlflow_preproc_dead_letter_brake") > 0
    found.waiting = first("mlflow_preproc_waiting_for_dependency") > 0
    return found


def _n(value: Any) -> str:
    return "-" if value is None else str(value)
