"""The pagefork daemon: templates, fork lifecycle, control API and metrics in one process.

- :mod:`.manager` the fork lifecycle and the hot-page loop, one page server per template;
- :mod:`.api` the JSON HTTP control API on a mode-0600 Unix socket;
- :mod:`.httpserver` the HTTP/1.1 server under it (h11, a selector loop, capped pools), with
  :mod:`.httpconn` (one connection), :mod:`.httptable` (the open connections),
  :mod:`.httppool` (the pools) and :mod:`.httpwire` (responses and limits);
- :mod:`.metrics` Prometheus metrics per template;
- :mod:`.service` :class:`Daemon`, which wires them together;
- :mod:`.client` a small client for the control socket.
"""
