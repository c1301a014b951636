"""An instance: engine worker, scheduler agent, P/D flows, HTTP server."""
