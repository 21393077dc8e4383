"""JSON schemas for the custom resources in deploy/, which kubernetes-validate lacks.

Minimal on purpose: the fields we use, with their types, and no others, so that a
typo (`endpoint:` for `endpoints:`) fails here as the real CRD would fail on apply.
Written from the Prometheus Operator (monitoring.coreos.com/v1) and KEDA
(keda.sh/v1alpha1) API references.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def _object(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


_STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = _object(
    {"name": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP},
    ("name",),
)
_DURATION: Schema = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABEL_SELECTOR = _object({"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}})


def _resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return _object(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


SERVICE_MONITOR = _resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    _object(
        {
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": {"type": "object"},
            "jobLabel": {"type": "string"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": _object(
                    {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"},
                    },
                    ("port",),
                ),
            },
        },
        ("selector", "endpoints"),
    ),
)

_RULE = {
    "oneOf": [
        _object({"record": {"type": "string"}, "expr": {"type": "string"}}, ("record", "expr")),
        _object(
            {
                "alert": {"type": "string"},
                "expr": {"type": "string"},
                "for": _DURATION,
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
            ("alert", "expr"),
        ),
    ]
}
PROMETHEUS_RULE = _resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    _object(
        {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": _object(
                    {
                        "name": {"type": "string"},
                        "interval": _DURATION,
                        "rules": {"type": "array", "minItems": 1, "items": _RULE},
                    },
                    ("name", "rules"),
                ),
            }
        },
        ("groups",),
    ),
)

SCALED_OBJECT = _resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    _object(
        {
            "scaleTargetRef": _object(
                {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "name": {"type": "string"},
                },
                ("name",),
            ),
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "fallback": _object(
                {"failureThreshold": {"type": "integer"}, "replicas": {"type": "integer"}},
                ("failureThreshold", "replicas"),
            ),
            "advanced": _object(
                {
                    "horizontalPodAutoscalerConfig": _object(
                        {"name": {"type": "string"}, "behavior": {"type": "object"}}
                    ),
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                }
            ),
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": _object(
                    {
                        "type": {"type": "string"},
                        "name": {"type": "string"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        # KEDA wants every metadata value as a string.
                        "metadata": _STRING_MAP,
                        "authenticationRef": {"type": "object"},
                    },
                    ("type", "metadata"),
                ),
            },
        },
        ("scaleTargetRef", "triggers"),
    ),
)

CUSTOM_RESOURCES: dict[tuple[str, str], Schema] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
