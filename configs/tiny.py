"""CPU demo: a 4-layer, d_model 128 byte-level decoder LM trained for a few minutes.

Run: python -m attnlab.train --config=configs/tiny.py --workdir=/tmp/attnlab-demo
Override any field, e.g. --config.model.pattern=LLLS --config.train.steps=300.
"""
from ml_collections import ConfigDict, config_dict

from attnlab.data import default_data_config


def get_config() -> ConfigDict:
    config = ConfigDict()

    config.model = ConfigDict()
    config.model.vocab_size = config_dict.placeholder(int)  # None: taken from the data
    config.model.d_model = 128
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = config_dict.placeholder(int)  # None: = num_heads
    config.model.head_dim = config_dict.placeholder(int)  # None: d_model // num_heads
    config.model.mlp_dim = 384
    config.model.pattern = "S"  # one letter per layer, repeated: S softmax, L linear, ...
    config.model.tie_embeddings = True
    config.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    config.model.param_dtype = "float32"
    config.model.attention_options = ConfigDict()  # attention name -> dict of layer kwargs

    config.train = ConfigDict()
    config.train.steps = 300
    config.train.batch_size = 16  # global, over all processes and devices
    config.train.seq_len = 128
    config.train.lr = 3e-3
    config.train.warmup_steps = 30
    config.train.min_lr_ratio = 0.1
    config.train.weight_decay = 0.1
    config.train.b1 = 0.9
    config.train.b2 = 0.95
    config.train.clip = 1.0
    config.train.seed = 0
    config.train.log_every = 20
    config.train.checkpoint_every = 100
    config.train.keep = 2
    config.train.peak_tflops_per_device = 0.0  # e.g. 989 for an H100 (bf16 dense): logs MFU; 0 = off

    config.mesh = ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by fsdp
    config.mesh.fsdp = 1

    config.data = default_data_config()
    return config
