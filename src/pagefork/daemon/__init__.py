"""The pagefork daemon: templates, fork lifecycle, control API and metrics in one process.

- :mod:`.manager` the fork lifecycle and the hot-page loop, one page server per template;
- :mod:`.api` the JSON HTTP control API on a mode-0600 Unix socket;
- :mod:`.httpserver` the HTTP/1.1 server under it (h11, a selector loop, a capped pool);
- :mod:`.metrics` Prometheus metrics per template;
- :mod:`.service` :class:`Daemon`, which wires them together;
- :mod:`.client` a small client for the control socket.
"""
