"""Live terminal output of a federated job: a progress bar over rounds and a per-round table
(global accuracy, loss, cumulative epsilon per institution, bytes uploaded)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedseek.aggregator.rounds import SilentReporter


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class RichReporter(SilentReporter):
    """Prints one table row per committed round as it happens (keeps no checkpoint, never stops a job)."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task_id = None
        self.sites: list[str] = []
        self.generative = False  # causal-lm: a perplexity column, `accuracy` is the task's score

    def start(self, job, data, initial) -> None:
        self.sites = list(data.institutions)
        self.generative = "perplexity" in initial
        dp = (f"DP on: target epsilon {job.privacy.target_epsilon:g} per institution, clip "
              f"{job.privacy.clip_norm:g}" if job.privacy.enabled else "DP off (--no-dp)")
        sizes = ", ".join(f"{n} {len(t)}" for n, t in zip(data.institutions, data.train))
        if job.data.period:
            self.console.print(f"[bold]period[/] [cyan]{job.data.period}[/] ({job.ewc.method})")
        self.console.print(f"[bold]FedSeek[/] task [cyan]{data.task}[/]: {len(data.label_names)} labels, "
                           f"records {sizes}; global test {len(data.test)}")
        self.console.print(f"{dp}; LoRA rank {job.lora.rank}{' (FFA)' if job.lora.ffa else ''}; "
                           f"{job.federation.rounds} rounds x {job.optim.local_steps} local steps; "
                           f"initial {'score' if self.generative else 'accuracy'} {initial['accuracy']:.1%}"
                           + (f", perplexity {initial['perplexity']:.1f}" if self.generative else ""))
        self._header()
        self.progress = Progress(TextColumn("rounds"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), console=self.console, transient=True)
        self.task_id = self.progress.add_task("rounds", total=job.federation.rounds)
        self.progress.start()

    def _header(self) -> None:
        sites = "".join(f"{'eps ' + s:>{self._width(s)}}" for s in self.sites)
        score = f"{'score':>10}{'ppl':>9}" if self.generative else f"{'accuracy':>10}"
        self.console.print(f"[bold]{'round':>5}{score}{'loss':>8}{sites}{'bytes up':>11}{'time':>7}[/]")

    @staticmethod
    def _width(site: str) -> int:
        return max(12, len(site) + 6)

    def round(self, row: dict) -> None:
        eps = "".join(f"{'-' if row['epsilon'].get(s) is None else format(row['epsilon'][s], '.2f'):>{self._width(s)}}"
                      for s in self.sites)
        ppl = f"{row['perplexity']:>9.2f}" if self.generative else ""
        self.console.print(f"{row['round']:>5}{row['accuracy']:>10.2%}{ppl}{row['loss']:>8.3f}{eps}"
                           f"{_bytes(row['bytes_up']):>11}{row['elapsed_s']:>6.0f}s", highlight=False)
        if self.progress is not None:
            self.progress.advance(self.task_id)

    def finish(self, report: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        eps = report.get("epsilon")
        spent = (", ".join(f"{k} {v:.2f}" for k, v in eps.items()) + f" at delta {report['delta']:.1e}"
                 if eps else "none (DP off)")
        score = "accuracy" if not self.generative else f"score ({report.get('score_metric')})"
        self.console.print(f"[bold green]done[/] final {score} {report['final_accuracy']:.2%} "
                           f"(initial {report['initial_accuracy']:.2%}); epsilon spent: {spent}")
        if self.generative:
            self.console.print(f"perplexity {report['initial_perplexity']:.1f} -> {report['final_perplexity']:.1f}, "
                               f"exact match {report['final_exact_match']:.2%}, ROUGE-L {report['final_rouge_l']:.3f}")
        self.console.print(f"adapter: {report['adapter_dir']} ({_bytes(report['adapter_bytes'])}); "
                           f"report: {report['adapter_dir'].rsplit('/', 1)[0]}/report.json")


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def print_cl_table(console: Console, report: dict) -> None:
    """Accuracy matrix of the main method and a method-comparison table (ACC, BWT, Forgetting)."""
    main = report["cl"]
    periods = main["periods"]
    console.print(f"[bold]accuracy matrix[/] ({main['method']}; rows: after period i, columns: period j)")
    console.print(f"{'':>14}" + "".join(f"{p:>13}" for p in periods))
    for name, row in zip(periods if len(main["accuracy_matrix"]) == len(periods) else ["all"],
                         main["accuracy_matrix"]):
        console.print(f"{name:>14}" + "".join(f"{_pct(v):>13}" for v in row), highlight=False)
    console.print(f"[bold]{'method':>12}{'lambda':>8}{'ACC':>8}{'BWT':>8}{'Forget':>8}{'time s':>8}{'max eps':>9}[/]")
    for summary in [main, *report.get("cl_compare", {}).values()]:
        lam = "-" if summary["lambda"] is None else f"{summary['lambda']:g}"
        eps = "-" if summary.get("epsilon_max") is None else f"{summary['epsilon_max']:.2f}"
        console.print(f"{summary['method']:>12}{lam:>8}{_pct(summary['acc']):>8}{_pct(summary['bwt']):>8}"
                      f"{_pct(summary['forgetting']):>8}{summary['wall_seconds']:>8.0f}{eps:>9}", highlight=False)
    if report.get("lambda_selection"):
        sel = report["lambda_selection"]
        console.print(f"λ chosen on validation splits: {sel['chosen']:g} {sel['validation_acc']}")
    console.print(f"heat-map: {report['adapter_dir'].rsplit('/', 1)[0]}/cl_heatmap.png; "
                  f"report: {report['adapter_dir'].rsplit('/', 1)[0]}/report.json")
