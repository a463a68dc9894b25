"""Schema checks for `cargo xtask manifests` (run with the pinned kubernetes-validate and
jsonschema that `cargo xtask setup` installs).

Reads one JSON document on stdin:
  {"kubernetes": "1.32.0",
   "objects": [{"source": ..., "object": {...}}],       # rendered manifests: Kubernetes schemas
   "no_schema": ["monitoring.coreos.com/v1 PodMonitor"],  # kinds known to have none here
   "crd": {...},                                          # the MeshPolicy CRD
   "custom": [{"source": ..., "object": {...}}]}        # examples: the CRD's openAPIV3Schema
Prints one line per problem, `SOURCE: Kind namespace/name FIELD: reason`, and exits 1 if any.
"""
import json
import sys

import jsonschema
import kubernetes_validate


def name(obj):
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return "%s %s%s" % (obj.get("kind", "?"), ns + "/" if ns else "", meta.get("name", "<unnamed>"))


def field(path):
    out = ""
    for part in path:
        out += "[%d]" % part if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(object)"


def structural_to_json_schema(schema, root=True):
    """The apiserver's reading of a structural schema, as plain JSON Schema: nullable,
    int-or-string, unknown fields rejected (as `kubectl apply`'s strict field validation does)."""
    s = dict(schema)
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
        if "enum" in s:
            s["enum"] = s["enum"] + [None]
    if s.get("x-kubernetes-int-or-string"):
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in s:
        s["properties"] = {k: structural_to_json_schema(v, False) for k, v in s["properties"].items()}
        if root:
            for k in ("apiVersion", "kind"):
                s["properties"].setdefault(k, {"type": "string"})
            s["properties"].setdefault("metadata", {"type": "object"})
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = structural_to_json_schema(s["additionalProperties"], False)
    if "items" in s:
        s["items"] = structural_to_json_schema(s["items"], False)
    return s


def list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: the apiserver rejects two items with the same keys."""
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for i, item in enumerate(instance):
        key = tuple(json.dumps(item.get(k)) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(
                "duplicate %s %s" % ("/".join(keys), ", ".join(key)), path=[i])
        seen.add(key)


CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-list-map-keys": list_map_keys})


def main():
    req = json.load(sys.stdin)
    problems = []
    checked = 0
    for entry in req["objects"]:
        obj, source = entry["object"], entry["source"]
        kind = "%s %s" % (obj.get("apiVersion"), obj.get("kind"))
        try:
            kubernetes_validate.validate(obj, req["kubernetes"], strict=True)
            checked += 1
        except kubernetes_validate.SchemaNotFoundError as e:
            if kind not in req["no_schema"]:
                problems.append("%s: %s: %s" % (source, name(obj), e.message))
            else:
                print("manifests: %s: %s has no schema here (not checked)" % (source, name(obj)))
        except kubernetes_validate.ValidationError as e:
            problems.append("%s: %s %s: %s" % (source, name(obj), field(e.absolute_path), e.message))

    crd = req["crd"]
    group, names = crd["spec"]["group"], crd["spec"]["names"]
    validators = {}
    for version in crd["spec"]["versions"]:
        schema = structural_to_json_schema(version["schema"]["openAPIV3Schema"])
        validators["%s/%s" % (group, version["name"])] = CrdValidator(schema)
    for entry in req["custom"]:
        obj, source = entry["object"], entry["source"]
        validator = validators.get(obj.get("apiVersion"))
        if obj.get("kind") != names["kind"] or validator is None:
            problems.append("%s: %s: not a %s of the CRD's versions" % (source, name(obj), names["kind"]))
            continue
        checked += 1
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            problems.append("%s: %s %s: %s" % (source, name(obj), field(e.absolute_path), e.message))

    for p in problems:
        print(p, file=sys.stderr)
    print("manifests: %d object(s) checked against their schemas, %d problem(s)" % (checked, len(problems)))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
