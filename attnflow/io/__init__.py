"""attnflow.io"""
