import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny networks: on a 2-core machine shared with
    other work, OpenMP threads spin against each other and make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Give batch norms of a randomly initialised network non-trivial statistics, so that
    folding them into convolutions is really exercised."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return module


def calibrate_bn(backbone: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Random batch-norm affines, then running statistics measured on ``x``: a random network
    whose features really depend on the input. (With default statistics the signal dies in the
    deep MobileNet-style networks: their features are the same for every image to ~1e-8, which
    would make equalities between outputs vacuous.) Returns the backbone in eval mode."""
    randomise_bn(backbone)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    backbone.train()
    with torch.no_grad():
        backbone(x)
    return backbone.eval()


def cli(*args) -> int:
    """``da3 ARGS`` through the CLI's entry point, from a fixed seed; its exit code."""
    from da3.cli import main

    torch.manual_seed(0)
    return main([str(a) for a in args])


def one_error_line(err: str, *needles: str) -> str:
    """The single ``da3: error:`` line of ``err`` (no traceback), holding every needle."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("da3: error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
