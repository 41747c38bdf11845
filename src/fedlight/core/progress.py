"""Progress bar that speaks in rounds and clients."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar

from fedlight.core.round import FederatedRound
from fedlight.core.runlog import MB


class FederatedProgressBar(TQDMProgressBar):
    """TQDM bar titled ``Round k/R`` showing clients done, running loss, MB so far and epsilon."""

    def _round(self, trainer) -> FederatedRound | None:
        return next((c for c in trainer.callbacks if isinstance(c, FederatedRound)), None)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        fed = self._round(trainer)
        if fed is not None:
            self.train_progress_bar.set_description(f"Round {trainer.current_epoch + 1}/{fed.rounds}")

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        fed = self._round(trainer)
        r = fed.engine.round if fed is not None else None
        if r is not None:
            items["clients"] = f"{r.clients_done}/{len(r.plan.clients)}"
            uplink = sum(u.num_bytes for u in r.updates)
            engine = fed.engine
            items["MB"] = f"{(engine.total_uplink + engine.total_downlink + uplink + r.downlink) / MB:.2f}"
            eps = engine.privacy.epsilon()
            if eps is not None:
                items["eps"] = f"{eps:.2f}"
        return items
