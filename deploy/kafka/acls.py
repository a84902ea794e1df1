"""The ACLs one `ner-stream run` worker needs, and a command to grant, revoke or show them.

The set is the least the worker works with (checked by tests/integration/test_secure_broker.py
against the secure local broker of kafka.sh):

- the consumer group (`--group-id`): READ (join, fetch and commit offsets; DESCRIBE is implied);
- the input topic: READ (fetch; DESCRIBE, which the start-up check that it exists needs, is
  implied);
- the output and dead-letter topics: WRITE (DESCRIBE implied). WRITE on a topic also lets the
  idempotent producer get its producer id (Kafka 2.8+, KIP-679), so IDEMPOTENT_WRITE on the
  cluster is not needed;
- exactly-once (`--processing-guarantee exactly-once`): WRITE on the transactional ids with the
  prefix `<group id>-` (DESCRIBE implied); the offsets it commits in a transaction go through the
  group's READ;
- optional: DESCRIBE_CONFIGS on the output and dead-letter topics, so that the worker reads their
  `max.message.bytes` at start (without it, the producer's limit stands: see `size_limits`).

`--create-topics` needs CREATE on the cluster (or on the topics) besides; it is left out here, as
topics are best created by whoever owns them.

    python deploy/kafka/acls.py show  --group-id ner-stream --input-topic documents \\
        --output-topic entities --dlq-topic documents.dlq [--exactly-once]
    python deploy/kafka/acls.py grant  ...same flags...   # as the admin of the secure local broker
    python deploy/kafka/acls.py revoke ...same flags...

`grant` and `revoke` connect as the super user `admin` of the broker that `kafka.sh` runs in
secure mode (its password and CA from `<state dir>/secure/`); `--bootstrap-servers`,
`--state-dir`, `--principal` point them elsewhere. Needs kafka-python (the project's venv).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PRINCIPAL = "User:ner-stream"
# Parts of a worker's ACL set, for granting or revoking one of them alone (the tests do).
PARTS = ("group", "input", "output", "dlq", "transactions", "configs")


@dataclass(frozen=True)
class Acl:
    """One ALLOW ACL for `principal` from any host: `operation` on a resource.

    `resource_type` is TOPIC, GROUP, TRANSACTIONAL_ID or CLUSTER; `pattern` LITERAL or PREFIXED;
    `part` says which of `PARTS` it belongs to.
    """

    part: str
    principal: str
    operation: str
    resource_type: str
    name: str
    pattern: str = "LITERAL"

    def describe(self) -> str:
        """One line: ``User:ner-stream  READ  TOPIC documents`` (``name*`` for a prefix)."""
        name = self.name + ("*" if self.pattern == "PREFIXED" else "")
        return f"{self.principal}  {self.operation:<16} {self.resource_type:<16} {name}"


def worker_acls(
    group_id: str,
    input_topic: str,
    output_topic: str,
    dlq_topic: str,
    *,
    principal: str = DEFAULT_PRINCIPAL,
    exactly_once: bool = False,
    describe_configs: bool = False,
    parts: Iterable[str] = PARTS,
) -> list[Acl]:
    """The ACLs a worker with these settings needs (see the module docstring), restricted to
    `parts`. Raises ValueError for an unknown part."""
    wanted = set(parts)
    unknown = wanted - set(PARTS)
    if unknown:
        raise ValueError(f"unknown ACL parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    acls = [
        Acl("group", principal, "READ", "GROUP", group_id),
        Acl("input", principal, "READ", "TOPIC", input_topic),
        Acl("output", principal, "WRITE", "TOPIC", output_topic),
        Acl("dlq", principal, "WRITE", "TOPIC", dlq_topic),
    ]
    if exactly_once:
        # The transactional id is "<group id>-<instance id>" (WorkerConfig.transactional_id):
        # one prefixed ACL covers every instance of the group.
        acls.append(
            Acl("transactions", principal, "WRITE", "TRANSACTIONAL_ID", f"{group_id}-", "PREFIXED")
        )
    if describe_configs:
        acls += [
            Acl("configs", principal, "DESCRIBE_CONFIGS", "TOPIC", output_topic),
            Acl("configs", principal, "DESCRIBE_CONFIGS", "TOPIC", dlq_topic),
        ]
    return [a for a in acls if a.part in wanted]


def kafka_acl(acl: Acl):
    """`acl` as kafka-python's `kafka.admin.ACL` (allowed from any host)."""
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    pattern = ResourcePattern(
        ResourceType[acl.resource_type], acl.name, ACLResourcePatternType[acl.pattern]
    )
    return ACL(acl.principal, "*", ACLOperation[acl.operation], ACLPermissionType.ALLOW, pattern)


def grant(admin, acls: list[Acl]) -> None:
    """Create `acls` with a connected `KafkaAdminClient` (creating one that exists is a no-op).

    Raises RuntimeError naming the ACLs the broker refused.
    """
    if not acls:
        return
    result = admin.create_acls([kafka_acl(a) for a in acls])
    if result["failed"]:
        raise RuntimeError(f"the broker refused to create ACLs: {result['failed']}")


def revoke(admin, acls: list[Acl]) -> None:
    """Delete `acls` (exactly these: same principal, operation and resource pattern)."""
    if not acls:
        return
    for _filter, _matched, error in admin.delete_acls([kafka_acl(a) for a in acls]):
        if error is not None and getattr(error, "errno", 0):
            raise RuntimeError(f"the broker refused to delete ACLs: {error}")


# Where kafka.sh keeps the secure broker's state and serves it, by default.
DEFAULT_STATE_DIR = HERE / ".state-secure"
DEFAULT_BOOTSTRAP = "127.0.0.1:9192"


def admin_security(state_dir: Path) -> dict:
    """kafka-python security settings of the secure local broker's super user `admin`."""
    secure = state_dir / "secure"
    password = secure / "admin.password"
    if not password.is_file():
        raise SystemExit(
            f"acls.py: {password} not found: start the secure broker first "
            "(make kafka-up-secure) or pass --state-dir"
        )
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "admin",
        "sasl_plain_password": password.read_text().strip(),
        "ssl_cafile": str(secure / "ca.pem"),
    }


def main(argv: list[str] | None = None) -> int:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description="The ACLs of one ner-stream worker.")
    p.add_argument("action", choices=["show", "grant", "revoke"])
    p.add_argument("--group-id", default="ner-stream")
    p.add_argument("--input-topic", default="documents")
    p.add_argument("--output-topic", default="entities")
    p.add_argument("--dlq-topic", default="documents.dlq")
    p.add_argument("--principal", default=DEFAULT_PRINCIPAL)
    p.add_argument("--exactly-once", action="store_true", help="add the transactional ids")
    p.add_argument(
        "--describe-configs", action="store_true", help="add DESCRIBE_CONFIGS (optional)"
    )
    p.add_argument("--only", action="append", choices=PARTS, help="just this part (repeatable)")
    p.add_argument(
        "--bootstrap-servers", default=DEFAULT_BOOTSTRAP, help="the secure local broker's"
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="kafka.sh's state folder of that broker (its admin password and CA are read there)",
    )
    args = p.parse_args(argv)
    acls = worker_acls(
        args.group_id,
        args.input_topic,
        args.output_topic,
        args.dlq_topic,
        principal=args.principal,
        exactly_once=args.exactly_once,
        describe_configs=args.describe_configs,
        parts=args.only or PARTS,
    )
    if args.action == "show":
        for acl in acls:
            print(acl.describe())
        return 0
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(
        bootstrap_servers=args.bootstrap_servers,
        **admin_security(args.state_dir),
    )
    try:
        (grant if args.action == "grant" else revoke)(admin, acls)
    finally:
        admin.close()
    for acl in acls:
        print(f"{'granted' if args.action == 'grant' else 'revoked'}: {acl.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
