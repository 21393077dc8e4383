"""The server's one typed settings object, built from CLI flags and `CNNSERVE_*` variables.

Precedence: a flag on the command line, else its environment variable, else the
default. Every field of `Settings` is one flag `--field-name` and one variable
`CNNSERVE_FIELD_NAME`; lists are comma-separated in the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONTROL_MODES = ("none", "poll", "explicit")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_PORT = 65535


@dataclass(frozen=True)
class Settings:
    repository: Path = field(
        default=Path("model_repository"), metadata={"help": "model repository folder"}
    )
    host: str = field(default="0.0.0.0", metadata={"help": "address to bind"})
    grpc_port: int = field(
        default=8001,
        metadata={"help": "gRPC port (0: any free port)", "range": (0, _PORT)},
    )
    metrics_port: int = field(
        default=8002,
        metadata={"help": "Prometheus /metrics port (-1: disabled, 0: any)", "range": (-1, _PORT)},
    )
    reuse_grpc_port: str = field(
        default="false",
        metadata={
            "help": "let several servers listen on one gRPC port (SO_REUSEPORT): true | false",
            "choices": ("true", "false"),
        },
    )
    model_control_mode: str = field(
        default="none", metadata={"help": "none | poll | explicit", "choices": CONTROL_MODES}
    )
    repository_poll_secs: float = field(
        default=5.0,
        metadata={"help": "seconds between repository scans in poll mode", "range": (0.05, None)},
    )
    load_model: tuple[str, ...] = field(
        default=(), metadata={"help": "model to load at start (repeatable; default: all)"}
    )
    max_message_bytes: int = field(
        default=256 * 1024 * 1024,
        # Below a few kilobytes not even a metadata answer fits.
        metadata={"help": "largest gRPC message, sent or received", "range": (4096, 2**31 - 1)},
    )
    grace_period_secs: float = field(
        default=30.0,
        metadata={"help": "time in-flight requests get to finish on shutdown", "range": (0, None)},
    )
    max_queue_size: int = field(
        default=1024,
        metadata={"help": "queue bound for models whose config sets none", "range": (1, None)},
    )
    max_image_bytes: int = field(
        default=20 * 1024 * 1024,
        metadata={"help": "largest encoded image Classify accepts", "range": (1, None)},
    )
    max_image_pixels: int = field(
        default=40_000_000,
        metadata={"help": "largest image (width x height) Classify decodes", "range": (1, None)},
    )
    preprocess_threads: int = field(
        default=max(1, min(4, os.cpu_count() or 1)),
        metadata={"help": "threads that decode and preprocess images", "range": (1, None)},
    )
    log_level: str = field(
        default="INFO",
        metadata={"help": "DEBUG | INFO | WARNING | ERROR (any case)"},
    )
    request_log_rate: float = field(
        default=0.0,
        metadata={"help": "fraction of inference requests logged, 0 to 1", "range": (0, 1)},
    )
    log_format: str = field(
        default="text", metadata={"help": "text | json", "choices": LOG_FORMATS}
    )
    tls_cert: Path | None = field(default=None, metadata={"help": "server certificate (PEM)"})
    tls_key: Path | None = field(default=None, metadata={"help": "server private key (PEM)"})
    tls_client_ca: Path | None = field(
        default=None, metadata={"help": "CA for client certificates (enables mutual TLS)"}
    )
    metrics_tls: str = field(
        default="false",
        metadata={
            "help": "serve /metrics over HTTPS with the gRPC certificate: true | false",
            "choices": ("true", "false"),
        },
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata={"help": "file of bearer tokens callers must send, one per line"},
    )
    admin_token_file: Path | None = field(
        default=None,
        metadata={"help": "file of tokens allowed to load and unload models, one per line"},
    )
    open_health: str = field(
        default="true",
        metadata={
            "help": "health and reflection need no token: true | false",
            "choices": ("true", "false"),
        },
    )

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for f in dataclasses.fields(self):
            flag, value = "--" + f.name.replace("_", "-"), getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{flag} must be one of {', '.join(choices)}")
            least, most = f.metadata.get("range", (None, None))
            if most is None and least is not None and value < least:
                raise ValueError(f"{flag} must be at least {least}, not {value}")
            if most is not None and not least <= value <= most:
                raise ValueError(f"{flag} must be between {least} and {most}, not {value}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        self._check_files()
        if not self.repository.is_dir():
            raise ValueError(f"model repository {self.repository} is not a folder")

    def _check_files(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is None and (self.tls_client_ca or self.metrics_tls == "true"):
            raise ValueError("--tls-client-ca and --metrics-tls need --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file", "admin_token_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
        for name in ("auth_token_file", "admin_token_file"):
            path = getattr(self, name)
            if path is not None and not path.read_bytes().split():
                raise ValueError(f"--{name.replace('_', '-')} {path}: holds no token")
        self._check_tls()

    def _check_tls(self) -> None:
        if self.tls_cert is not None and self.tls_key is not None:
            # gRPC would only say that the port could not be bound.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            except (ssl.SSLError, OSError) as exc:
                raise ValueError(
                    f"--tls-cert {self.tls_cert} and --tls-key {self.tls_key} are not a PEM "
                    f"certificate chain and its private key ({exc})"
                ) from None
            if self.tls_client_ca is not None:
                try:
                    context.load_verify_locations(self.tls_client_ca)
                except (ssl.SSLError, OSError) as exc:
                    raise ValueError(
                        f"--tls-client-ca {self.tls_client_ca}: not PEM CA certificates ({exc})"
                    ) from None


def _env_name(name: str) -> str:
    return f"CNNSERVE_{name.upper()}"


def _converter(f: dataclasses.Field[Any]) -> Any:
    kind = str(f.type)
    if "tuple" in kind:
        return str
    if "Path" in kind:
        return Path
    if kind == "int":
        return int
    if kind == "float":
        return float
    return str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; defaults stay None so that the environment can fill them."""
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [{_env_name(f.name)}]"
        if "tuple" in str(f.type):
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            parser.add_argument(
                flag,
                type=_converter(f),
                default=None,
                choices=f.metadata.get("choices"),
                help=help_text,
            )


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags, falling back on `CNNSERVE_*` variables, then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        value = getattr(args, f.name, None)
        if value is None and _env_name(f.name) in env:
            raw = env[_env_name(f.name)]
            if "tuple" in str(f.type):
                value = [v.strip() for v in raw.split(",") if v.strip()]
            else:
                try:
                    value = _converter(f)(raw)
                except ValueError as exc:
                    raise ValueError(f"{_env_name(f.name)}={raw!r}: {exc}") from exc
        if value is not None:
            values[f.name] = tuple(value) if "tuple" in str(f.type) else value
    settings = Settings(**values)
    settings.validate()
    return settings
