"""Friendly 404 and 500 pages in development mode too.

With DEBUG off, Django renders templates/404.html and 500.html itself. With DEBUG on (what `make run` uses),
it would show its debug pages instead: settings, URL patterns and tracebacks, fine for a developer but not
what someone trying Chorus expects. This middleware swaps those debug pages (and only those: a view's own 404
page is kept) for the friendly ones, which then say how to see the debug page; the traceback of a 500 is
still logged by Django. Set CHORUS_DEBUG_PAGES=1 to get Django's debug pages back. /api/ keeps its JSON.
"""

from django.conf import settings
from django.http import HttpResponseServerError
from django.shortcuts import render
from django.template import loader

DEBUG_PAGE_MARK = b"DEBUG = True"  # what Django's technical 404 and 500 pages say at their end


class FriendlyErrorPagesMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (
            response.status_code in (404, 500)
            and settings.DEBUG
            and not settings.CHORUS_DEBUG_PAGES
            and not request.path.startswith("/api/")
            and response.get("Content-Type", "").startswith("text/html")
            and not response.streaming
            and DEBUG_PAGE_MARK in response.content
        ):
            context = {"dev_note": True, "request_path": request.path}
            if response.status_code == 404:
                return render(request, "404.html", context, status=404)
            # As Django's own 500 handler: no request context, since whatever failed may fail again.
            return HttpResponseServerError(loader.get_template("500.html").render(context))
        return response
