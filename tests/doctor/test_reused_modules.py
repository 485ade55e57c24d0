"""A module used more than once in a forward pass, as users write it.

Ported from the everyday pattern behind the issue's crash (issue 13): one ``nn.ReLU`` kept as
``self.act`` and applied after layers of different widths. The doctor's forward hook stacked the
per-call masks of dead units and raised ``RuntimeError: stack expects each tensor to be equal
size`` inside the user's loop. It now watches such a module per call site ("act", then "act#2"),
so a second site's dead units are not hidden by the first's, and, whatever a statistic does, never
raises into the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from gradwise.doctor import Doctor


class SharedActivation(nn.Module):
    def __init__(self, dead_second: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 3)
        self.act = nn.ReLU()  # one module, two widths
        if dead_second:
            with torch.no_grad():
                self.fc2.bias.fill_(-100.0)  # every unit after fc2 dead from step 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def train(model: nn.Module, steps: int = 60) -> Doctor:
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    doctor = Doctor(model, optimizer, task="multiclass", sample_every=1, on_finding=None)
    for _ in range(steps):  # a plain PyTorch loop
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        doctor.step(loss, inputs=x, outputs=model(x).detach(), targets=y)
        optimizer.step()
    return doctor


def test_a_relu_reused_at_two_widths_trains_and_is_watched_per_call_site():
    torch.manual_seed(0)
    doctor = train(SharedActivation())
    assert {"act", "act#2"} == set(doctor.signals.activations)
    assert "GW304" not in {f.code for f in doctor.findings}


def test_dead_units_at_the_second_width_are_found():
    torch.manual_seed(0)
    doctor = train(SharedActivation(dead_second=True))
    dead = doctor.signals.activations["act#2"].dead
    assert dead.values and dead.values[-1] == 1.0
    assert doctor.signals.activations["act"].dead.values[-1] < 0.5
    assert "GW304" in {f.code for f in doctor.findings}


class SameWidthTwice(nn.Module):
    """One ReLU after two layers of the same width: only the second site's units are dead."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.fc2.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def test_dead_units_at_a_second_call_site_of_the_same_width_are_found():
    doctor = train(SameWidthTwice(), steps=10)
    assert doctor.signals.activations["act#2"].dead.values[-1] == 1.0
    assert "GW304" in {f.code for f in doctor.findings}
