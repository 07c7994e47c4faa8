"""URL configuration: admin, Django's auth views, and the app's pages and API."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("agents_app.web.urls")),
]
