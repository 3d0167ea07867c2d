"""The training benchmark's Markdown table, from its JSON report (so the two never disagree)."""

RATIO_KEYS = {"suite": "ratio", "suite_bf16_forced": "ratio_bf16_forced", "suite_fp32_forced": "ratio_fp32_forced",
              "suite_glibc": "ratio_glibc", "suite_compiled": "ratio_compiled"}
LABELS = {"suite_bf16_forced": "suite, bf16 forced", "suite_fp32_forced": "suite, fp32 forced",
          "suite_glibc": "suite, C library's malloc", "suite_compiled": "suite, --compile"}


NO_TCMALLOC = "the C library's malloc: no tcmalloc found, or --allocator none"


def peak_mb(row):
    """The memory that limits the batch: CUDA's allocator peak on a GPU, else the process's RSS."""
    return row.get("peak_cuda_mb", row["peak_rss_mb"])


def _range(values, suffix=""):
    """The rounds' lowest and highest value, "2.61–2.90" (one value when they agree)."""
    low, high = f"{min(values):.2f}{suffix}", f"{max(values):.2f}{suffix}"
    return low if low == high else f"{low}–{high}"


def training_table(report):
    m, s = report["machine"], report["settings"]
    peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in m["matmul_peak_gflops"].items())
    bf16 = "" if m["device"].startswith("cuda") else (", native bf16" if m.get("cpu_has_bf16") else ", no native bf16")
    memory = ("torch.cuda.max_memory_allocated" if m["device"].startswith("cuda")
              else "the training process's RSS high-water mark, DataLoader workers not included")
    lines = [
        "# Training throughput: the suite versus a straightforward implementation", "",
        f"`{report['command']}`", "",
        f"{m['device']} ({m['name']}{bf16}, {m['threads']} threads), torch {m['torch']}; "
        f"measured matmul peak: {peaks}. "
        f"Synthetic {s['synthetic_size']}-px JPEGs ({s['images']} images), {s['image_size']}-px crops, "
        f"{s['batch_size']} triplets per step. {s['rounds']} rounds, each path in a fresh process per round and "
        f"the paths alternating, each timing {s['steps']} steps after {s['warmup']} warm-up "
        f"step{'' if s['warmup'] == 1 else 's'}: triplets/s is "
        f"all timed triplets over all timed seconds (the rounds' range in brackets), the ratio that of these "
        f"rates (the range of each round's ratio in brackets). "
        f"Peak memory: {memory}. The reference is the plain implementation in triplet/bench/reference.py, "
        f"with the C library's malloc; the suite starts with the allocator `make` starts train.py with "
        f"({m.get('allocator_library') or NO_TCMALLOC}).", "",
        "| Backbone | Path | Data | Precision | Workers, threads | Allocator | Triplets/s | Images/s | vs reference | s/step "
        "| Peak memory (MiB) | Share of matmul peak |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, result in report["backbones"].items():
        for name in ("reference", *RATIO_KEYS):
            if name in result:
                r = result[name]
                label = LABELS.get(name, name)
                key = RATIO_KEYS.get(name)
                ratio = f"**{result[key]:.2f}x** ({_range(result[key + '_rounds'], 'x')})" if key else "1.00x"
                workers = f"{r['workers']}, {r['threads']}" if "threads" in r else r["workers"]
                lines.append(f"| {backbone} | {label} | {r['data']} | {r['precision']}, {r['memory_format']} | "
                             f"{workers} | {r.get('allocator', '')} | "
                             f"{r['triplets_per_s']:.2f} ({_range(r['rounds'])}) | "
                             f"{3 * r['triplets_per_s']:.1f} | {ratio} | {r['step_s']:.2f} | {peak_mb(r):,.0f} | "
                             f"{100 * r['share_of_peak']:.1f}% of {r['share_of']} |")
    lines += ["", "| Backbone | Embedding images/s | Precision | Peak memory (MiB) | Share of matmul peak |",
              "|---|---:|---|---:|---:|"]
    for backbone, result in report["backbones"].items():
        e = result["embedding"]
        lines.append(f"| {backbone} | {e['images_per_s']:.1f} | {e['precision']} | {peak_mb(e):,.0f} | "
                     f"{100 * e['share_of_peak']:.1f}% of {e['share_of']} |")
    d = report["data_path"]
    lines += ["", f"The suite's data path alone (decode, augment, collate uint8; one worker, {d['images']} images after "
              f"draining the prefetch): **{d['images_per_s_per_worker']:.0f} images/s per worker**."]
    profiled = {b: r["profile"] for b, r in report["backbones"].items() if "profile" in r}
    if profiled:
        time_of = "GPU time" if m["device"].startswith("cuda") else "CPU time"
        lines += ["", f"Where one suite step's time goes (`--profile`: torch.profiler, aten operators' self {time_of} "
                  "as a share of the step's wall time; random images, loader excluded):", "",
                  "| Backbone | Step (s) | Convolutions | Batch norm | Other | Convolutions' GFLOP/s "
                  "| Share of matmul peak |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for backbone, p in profiled.items():
            sh = p["shares"]
            lines.append(f"| {backbone} | {p['step_s']:.2f} | {100 * sh['convolution']:.0f}% | "
                         f"{100 * sh['batch_norm']:.0f}% | {100 * sh['other']:.0f}% | {p['conv_gflops']:,.0f} | "
                         f"{100 * p['conv_share_of_peak']:.0f}% of {p['share_of']} |")
    return "\n".join(lines) + "\n"
