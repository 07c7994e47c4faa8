"""Page and API routes."""

from django.urls import path

from agents_app import api, views

urlpatterns = [
    path("", views.conversation_list, name="conversation-list"),
    path("conversations/new/", views.conversation_create, name="conversation-create"),
    path("conversations/<uuid:conversation_id>/", views.conversation_detail, name="conversation-detail"),
    path("accounts/signup/", views.signup, name="signup"),
    path("healthz", views.healthz, name="healthz"),
    path("api/conversations/", api.conversations, name="api-conversations"),
    path("api/conversations/<uuid:conversation_id>/messages/", api.conversation_messages, name="api-messages"),
    path("api/conversations/<uuid:conversation_id>/events/", api.conversation_events, name="api-events"),
    path("api/teams/", api.teams, name="api-teams"),
]
