"""attnflow.analysis"""
