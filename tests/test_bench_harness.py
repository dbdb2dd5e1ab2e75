"""`make bench` harness: a --quick run on the tiny model writes valid JSON and a plot.

No timing assertions: only that every phase ran, answered without errors and reported sane,
self-consistent figures.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import loadgen, run_all


def test_percentile_against_sorted_reference() -> None:
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert loadgen.percentile(xs, 50) == 3.0
    assert loadgen.percentile(xs, 0) == 1.0 and loadgen.percentile(xs, 100) == 5.0
    assert loadgen.percentile(xs, 90) == pytest.approx(4.6)  # 4 + 0.6 × (5 − 4)
    assert math.isnan(loadgen.percentile([], 50))


def _http_test_server(seen: list[dict], opened: list[int]):  # type: ignore[no-untyped-def]
    """A hand-written HTTP/1.1 handler: answers by the body's `kind`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(1)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            body = json.loads(await reader.readexactly(length))
            seen.append(body)
            kind = body["kind"]
            if kind == "chunked":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b'3\r\n{"a\r\n3\r\n": 1\r\n1\r\n}\r\n0\r\n\r\n'
                )
            elif kind in ("close", "quiet"):  # quiet: closes without saying so (keep-alive end)
                close = b"Connection: close\r\n" if kind == "close" else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + close + b"\r\n{}")
                await writer.drain()
                writer.close()
                return
            elif kind == "busy":
                writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 2\r\n\r\n{}")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()

    return handle


def test_load_generator_speaks_http_with_keep_alive_chunks_and_close() -> None:
    """The raw client against a hand-written HTTP/1.1 server: Content-Length answers on one
    kept-alive connection, a chunked answer, a `Connection: close` answer and a silent close
    (the client must reconnect; the request after the silent close is retried once, never
    lost), and a non-200 status (counted as an error, not a latency)."""
    seen: list[dict] = []
    opened: list[int] = []
    kinds = ["plain", "chunked", "plain", "close", "plain", "quiet", "plain", "busy", "plain"]

    async def main() -> tuple[list[float], dict[str, int], float]:
        server = await asyncio.start_server(_http_test_server(seen, opened), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        payloads = [{"kind": k, "i": i} for i, k in enumerate(kinds)]
        async with server:
            return await loadgen._run(f"http://127.0.0.1:{port}/x?y=1", payloads, 1, 10.0)

    latencies, errors, _ = asyncio.run(main())
    assert [b["i"] for b in seen] == list(range(len(kinds)))  # in order, each body intact
    assert len(latencies) == len(kinds) - 1 and errors == {"429": 1}
    assert len(opened) == 3  # one reconnect after each close


def test_connection_idle_too_long_is_replaced_before_use() -> None:
    seen: list[dict] = []
    opened: list[int] = []

    async def main() -> tuple[int, int]:
        server = await asyncio.start_server(_http_test_server(seen, opened), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            keep = loadgen.Connection("127.0.0.1", port, "/x", max_idle_s=60.0)
            fresh = loadgen.Connection("127.0.0.1", port, "/x", max_idle_s=0.0)
            for conn in (keep, fresh):
                for i in range(3):
                    status, _ = await conn.post(json.dumps({"kind": "plain", "i": i}).encode())
                    assert status == 200
                    await asyncio.sleep(0.01)
                conn.close()
            return keep.opened, fresh.opened

    assert asyncio.run(main()) == (1, 3)


def test_batch_stats_from_histogram_deltas() -> None:
    before = {
        "gpm_batch_size_count{}": 1.0,
        "gpm_batch_size_sum{}": 1.0,
        "gpm_batch_size_bucket{le=1.0}": 1.0,  # cumulative buckets: one batch of 1
        "gpm_batch_size_bucket{le=4.0}": 1.0,
        "gpm_batch_size_bucket{le=8.0}": 1.0,
    }
    after = {
        "gpm_batch_size_count{}": 4.0,
        "gpm_batch_size_sum{}": 13.0,
        "gpm_batch_size_bucket{le=1.0}": 1.0,
        "gpm_batch_size_bucket{le=4.0}": 2.0,  # then one batch of 4 and two of 8
        "gpm_batch_size_bucket{le=8.0}": 4.0,
        "gpm_batch_tokens_sum{kind=padded}": 100.0,
        "gpm_batch_tokens_sum{kind=real}": 75.0,
    }
    stats = loadgen.batch_stats(before, after)
    assert stats["batches"] == 3 and stats["mean_batch_size"] == 4.0
    assert stats["batch_size_histogram"] == {"4.0": 1.0, "8.0": 2.0}
    assert stats["padding_fraction"] == pytest.approx(0.25)


def test_requests_per_level() -> None:
    args = run_all.argparse.Namespace(
        model="tiny",
        quick=True,
        levels="1,4",
        level_seconds=None,
        max_requests=None,
        n_groups=None,
        raw_budget_s=None,
        max_batch_size=None,
        skip_vllm=False,
    )
    cfg = run_all.make_config(args)
    assert cfg.levels == [1, 4] and not cfg.vllm
    assert run_all.requests_for(4, rate=0.0, cfg=cfg) == 8  # 2 × concurrency
    assert run_all.requests_for(256, rate=0.0, cfg=cfg) == 256  # never below the concurrency
    assert run_all.requests_for(1, rate=1e6, cfg=cfg) == cfg.max_requests


@pytest.mark.slow
def test_quick_run_writes_json_and_plot(tmp_path: Path) -> None:
    argv = ["--quick", "--model", "tiny", "--out", str(tmp_path), "--threads", "1"]
    argv += ["--levels", "1,4", "--max-requests", "8", "--groups", "2"]
    argv += ["--raw-seconds", "0.2", "--level-seconds", "0.1"]
    assert run_all.main(argv) == 0
    result = json.loads((tmp_path / "bench_tiny_quick.json").read_text())
    assert (tmp_path / "bench_tiny_quick.png").stat().st_size > 1000
    ip = result["in_process"]
    for key in ("single_raw", "group_raw", "group_raw_shared"):
        best = ip[key]["best"]
        assert best["sequences_per_s"] > 0
        assert best["sequences_per_s"] == max(r["sequences_per_s"] for r in ip[key]["runs"])
    assert ip["group_raw_shared"]["sharing"] and not ip["group_raw"]["sharing"]
    assert ip["sharing_savings"]["ratio"] > 1.5  # 512-token prompt shared by 8 responses
    assert 0 <= ip["bf16"]["max_abs_preference_probability"] < 1
    for server in ("service", "per_request"):
        levels = result[server]["single"]
        assert [r["concurrency"] for r in levels] == [1, 4]
        for r in levels:
            assert r["errors"] == 0 and r["responses"] == r["requests"]
            assert 0 < r["p50_s"] <= r["p90_s"] <= r["p99_s"] <= r["max_s"]
            assert r["responses_per_s"] == pytest.approx(r["responses"] / r["wall_s"])
        groups = result[server]["groups"]
        assert groups["errors"] == 0 and groups["responses"] == 2 * 8
    # the service's /metrics saw every sequence; the peer has no /metrics
    c4 = result["service"]["single"][1]["server"]
    assert c4["real_tokens"] == sum(r["tokens"] for r in [result["service"]["single"][1]])
    assert 0 <= c4["padding_fraction"] < 1 and c4["mean_batch_size"] >= 1
    assert result["per_request"]["single"][0]["server"] == {}
    assert result["vllm"]["skipped"]
    assert {"c64_vs_per_request", "c1_p50_minus_forward_ms"} <= set(result["targets"])


def test_vllm_view_drops_our_heads_and_raises_positions_for_default_rope(tmp_path: Path) -> None:
    from benchmarks import vllm_pooling

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w")
    config = {"max_position_embeddings": 512, "rope_parameters": {"rope_type": "default"}}
    (model / "config.json").write_text(json.dumps(config))
    assert vllm_pooling.model_view(str(model), 400, str(tmp_path / "a")) == str(model)
    view = Path(vllm_pooling.model_view(str(model), 700, str(tmp_path / "b")))
    assert view != model
    assert json.loads((view / "config.json").read_text())["max_position_embeddings"] == 700
    assert (view / "model.safetensors").read_bytes() == b"w"
    assert json.loads((model / "config.json").read_text())["max_position_embeddings"] == 512
    (model / "gpm_heads.safetensors").write_bytes(b"h")  # an embedded-backbone checkpoint
    view = Path(vllm_pooling.model_view(str(model), 400, str(tmp_path / "c")))
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((view / "config.json").read_text())["max_position_embeddings"] == 512
    scaled = {"max_position_embeddings": 512, "rope_parameters": {"rope_type": "llama3"}}
    (model / "config.json").write_text(json.dumps(scaled))
    view = Path(vllm_pooling.model_view(str(model), 700, str(tmp_path / "d")))
    assert json.loads((view / "config.json").read_text())["max_position_embeddings"] == 512


def test_random_llama_shape_builds_a_servable_checkpoint(tmp_path: Path) -> None:
    """The GPU rows' model code path (`llama8b-random`), at a size a CPU test can build."""
    from benchmarks import models
    from gpm_server.model import GPM

    path = models.prepare("llama-small-random", tmp_path, max_length=300, dtype="float32")
    gpm = GPM.from_pretrained(path)
    shape = models.LLAMA_SHAPES["llama-small-random"]
    config = gpm.backbone.config
    assert (config.hidden_size, config.num_hidden_layers) == (128, 2)
    assert (config.num_key_value_heads, config.vocab_size) == (2, shape["vocab_size"])
    assert gpm.k == 4 and gpm.max_length == 300
    out = gpm.embed([("Explain the sky.", "Rayleigh scattering."), ("Hi", "Hello")])
    assert out.embeddings.shape == (2, 8) and torch.isfinite(out.embeddings).all()
    with pytest.raises(ValueError, match="unknown model"):
        models.prepare("llama70b", tmp_path)
