"""The local dashboard: an aiohttp app on 127.0.0.1 and one static page (node/gui/static).

It drives the node only through the control commands the CLI uses (a dispatcher the
daemon passes in); it imports no service and never daemon.py.
"""
