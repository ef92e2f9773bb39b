"""A third-party reader of the chat log: stock confluent-kafka with its
AvroDeserializer against the registry's Confluent-compatible API.

It reads N records from a topic and prints each decoded record as one JSON
line, normalised so that a test in another language can compare it field by
field: timestamps as epoch milliseconds, UUIDs as strings, and a union branch
that is a record as {"__type": <full name>, ...fields}.

usage: read_with_confluent.py --brokers B --registry URL --topic T --count N
"""

import argparse
import datetime
import json
import sys
import uuid

from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def normalise(value):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        # return_record_name=True: (record full name, fields) for a union branch.
        name, fields = value
        out = {"__type": name}
        out.update(normalise(fields))
        return out
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, datetime.datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--registry", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    registry = SchemaRegistryClient({"url": args.registry})
    deserializer = AvroDeserializer(registry, return_record_name=True)
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": "third-party-" + uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([args.topic])
    seen = 0
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=args.timeout)
    while seen < args.count and datetime.datetime.now() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            print("kafka error: %s" % msg.error(), file=sys.stderr)
            continue
        ctx = SerializationContext(msg.topic(), MessageField.VALUE)
        record = deserializer(msg.value(), ctx)
        print(json.dumps(normalise(record), sort_keys=True), flush=True)
        seen += 1
    consumer.close()
    if seen < args.count:
        print("read %d of %d records before the timeout" % (seen, args.count), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
