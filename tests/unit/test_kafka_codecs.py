"""Record batches compressed with any codec a Kafka client may choose can be read back: the codec
libraries kafka-python looks for are installed with ner-stream. (Batches written by the Java
client, read by a real worker: tests/integration/test_hostile_records.py.)"""

from __future__ import annotations

import pytest
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

CODECS = {
    "gzip": DefaultRecordBatchBuilder.CODEC_GZIP,
    "snappy": DefaultRecordBatchBuilder.CODEC_SNAPPY,
    "lz4": DefaultRecordBatchBuilder.CODEC_LZ4,
    "zstd": DefaultRecordBatchBuilder.CODEC_ZSTD,
}


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_compressed_batch_round_trips(codec):
    values = [
        f'{{"id": "d-{i}", "text": "Angela Merkel visited Paris {i}."}}'.encode() for i in range(50)
    ]
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=CODECS[codec],
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset, value in enumerate(values):
        builder.append(offset, timestamp=None, key=b"k", value=value, headers=[("h", b"1")])
    data = bytes(builder.build())
    assert len(data) < sum(map(len, values)), "the batch should really be compressed"

    batch = MemoryRecords(data).next_batch()
    assert batch.compression_type == CODECS[codec]
    records = list(batch)
    assert [r.value for r in records] == values
    assert all(r.key == b"k" and r.headers == [("h", b"1")] for r in records)
