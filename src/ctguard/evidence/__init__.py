"""Evidence bundles: what filled the conntrack table, captured at the moment of pressure.

- `bundle`: capture (collectors in a budget, the table dump, the timeline), the bundle store
  (list, prune, export with redaction);
- `collect`, `netinfo`: the collectors; `redact`: pseudonymised addresses for an export;
- `review`: a bundle read back and told (verdict, findings, timeline); `report`: the HTML page.

The command line's side is ctguard.cli.bundles; the daemon starts `ctguard capture` children
(ctguard.daemon.captures).
"""
