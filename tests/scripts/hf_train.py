"""A Hugging Face's Trainer script that knows nothing of lnsp: 640 samples, batch 16, 3 epochs
(120 optimizer steps). The guard's tests run it under `lnsp run` and count the steps
its heartbeat saw against the framework's own global step."""

import sys

import torch
from transformers import Trainer, TrainingArguments


class Data(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(640, 8)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.x[i].sum(0, keepdim=True)}


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


args = TrainingArguments(output_dir=sys.argv[1] if len(sys.argv) > 1 else "hf-out", per_device_train_batch_size=16, num_train_epochs=3,
                         report_to=[], save_strategy="no", logging_strategy="no",
                         disable_tqdm=True, use_cpu=True)
trainer = Trainer(model=Model(), args=args, train_dataset=Data())
trainer.train()
print("hf global_step", trainer.state.global_step, flush=True)
