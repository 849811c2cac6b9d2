"""The web pages under ``/ui`` (``service.ui.pages``): Jinja2 templates rendered on the server, charts
drawn by matplotlib as inline SVG, no JavaScript."""
