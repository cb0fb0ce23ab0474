"""Shared fixtures: a tiny random Llama (head_dim 32) built in memory, no download."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(seed: int = 0, vocab: int = 64, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).float().eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def assert_matches_separate_forwards(model, out, prompts, chosen, rejected):
    """`out`'s {chosen,rejected}_logps and _lengths ([B] each) equal each pair's own unpadded sequences',
    scored with log_softmax token by token."""
    import math

    for i in range(len(prompts)):
        for key, resp in (("chosen", chosen[i]), ("rejected", rejected[i])):
            seq = torch.tensor([list(prompts[i]) + list(resp)])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq).logits[0].double(), -1)
            start = len(prompts[i])
            expected = sum(logp[t - 1, seq[0, t]].item() for t in range(start, seq.shape[1]))
            assert math.isclose(float(out[f"{key}_logps"][i]), expected, abs_tol=1e-4), (i, key)
            assert int(out[f"{key}_lengths"][i]) == len(resp)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto) speaking the real S3 HTTP protocol, so object-store URIs
    go through pyarrow's S3 filesystem exactly as on a cloud bucket. Yields a function that makes a
    bucket and returns its base URI (credentials and endpoint in the URI, for every Ray worker)."""
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")

    def bucket() -> str:
        name = f"ropo-{uuid.uuid4().hex[:10]}"
        client.create_bucket(Bucket=name)
        return f"s3://test:test@{name}/run?scheme=http&endpoint_override={host}:{port}&region=us-east-1"

    yield bucket
    server.stop()
