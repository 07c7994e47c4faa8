"""Page and API routes."""

from django.urls import path

from agents_app.web import api, settings_views, views

urlpatterns = [
    path("", views.conversation_list, name="conversation-list"),
    path("conversations/new/", views.conversation_create, name="conversation-create"),
    path("conversations/<uuid:conversation_id>/", views.conversation_detail, name="conversation-detail"),
    path("accounts/signup/", views.signup, name="signup"),
    path("share/<uuid:link_id>/<str:secret>/", views.shared_conversation, name="shared-conversation"),
    path("healthz", views.healthz, name="healthz"),
    path("settings/", settings_views.api_tokens, name="settings-tokens"),
    path("settings/tokens/<uuid:token_id>/revoke/", settings_views.api_token_revoke, name="settings-token-revoke"),
    path("settings/usage/", views.settings_usage, name="settings-usage"),
    # The JSON API, its OpenAPI document (/api/schema/) and docs (/api/docs/), AG-UI: agents_app/web/api.py.
    path("api/", api.api.urls),
]
